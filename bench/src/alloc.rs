//! The process's allocator: the system's, counting bytes only while a
//! [`Region`] is open (the table-memory scenario measures what
//! `KafkaStore::open` leaves allocated).
//!
//! A counting allocator that counts all the time puts two atomic
//! read-modify-writes, on cache lines every thread shares, on every
//! allocation and every free of the whole run. No service pays that, and
//! it weighs most on whichever side of a ratio allocates more. Outside a
//! region an allocation costs one relaxed load more than the system's.

// A global allocator is an unsafe trait; every method forwards to `System`.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// The global allocator of kes-bench.
pub struct Counting;

/// Regions open now; counting happens while above 0.
static OPEN: AtomicUsize = AtomicUsize::new(0);
/// Bytes allocated while counting (a realloc's growth included).
static ALLOCATED: AtomicU64 = AtomicU64::new(0);
/// Bytes freed while counting (a realloc's shrinking included).
static FREED: AtomicU64 = AtomicU64::new(0);

fn counting() -> bool {
    OPEN.load(Ordering::Relaxed) > 0
}

fn count(total: &AtomicU64, bytes: usize) {
    total.fetch_add(bytes as u64, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to `System` with the caller's arguments;
// the counters only observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() && counting() {
            count(&ALLOCATED, layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() && counting() {
            count(&ALLOCATED, layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) };
        if counting() {
            count(&FREED, layout.size());
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() && counting() {
            match new_size.checked_sub(layout.size()) {
                Some(grown) => count(&ALLOCATED, grown),
                None => count(&FREED, layout.size() - new_size),
            }
        }
        p
    }
}

/// Counts the process's allocations from [`Region::start`] until dropped.
pub struct Region {
    allocated: u64,
    freed: u64,
}

impl Region {
    /// Starts counting.
    pub fn start() -> Self {
        OPEN.fetch_add(1, Ordering::SeqCst);
        Self { allocated: ALLOCATED.load(Ordering::SeqCst), freed: FREED.load(Ordering::SeqCst) }
    }

    /// Bytes allocated minus bytes freed since the start: what the process
    /// holds more than then (negative when it freed older memory).
    pub fn held(&self) -> i64 {
        let allocated = ALLOCATED.load(Ordering::SeqCst).wrapping_sub(self.allocated);
        let freed = FREED.load(Ordering::SeqCst).wrapping_sub(self.freed);
        allocated as i64 - freed as i64
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::Region;

    #[test]
    fn a_region_counts_what_is_allocated_and_freed_inside_it() {
        const SIZE: i64 = 64 << 20;
        // Other test threads allocate and free meanwhile, a few kilobytes:
        // far less than this slack.
        const SLACK: i64 = 1 << 20;
        let region = Region::start();
        let kept: Vec<u8> = Vec::with_capacity(SIZE as usize);
        let held = region.held();
        assert!((SIZE - SLACK..SIZE + SLACK).contains(&held), "held {held}");
        drop(kept);
        let after = region.held();
        assert!((-SLACK..SLACK).contains(&after), "held {after} after the free");
    }
}
