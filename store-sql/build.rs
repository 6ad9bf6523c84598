//! The migrations are read by `sqlx::migrate!` at compile time, which cargo
//! does not see: without this, adding or editing a migration would not
//! rebuild the crate, and a binary could ship without it.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
