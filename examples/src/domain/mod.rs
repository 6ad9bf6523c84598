//! The example domain: projects and their tasks.

pub mod project;
pub mod task;

pub use project::{
    DEFAULT_CURRENCY, Money, Project, ProjectCommand, ProjectError, ProjectEvent, ProjectFields, Status,
};
pub use task::{Task, TaskCommand, TaskError, TaskEvent, TaskStatus};

/// The JSON Schema pattern of a text the domain refuses when blank (names,
/// titles): at least one character outside Unicode's `White_Space`, the
/// set `str::trim` removes, so that the OpenAPI document admits exactly
/// the texts the rules accept. The characters are written out: `\s`
/// differs between dialects (ECMA-262's holds U+FEFF and not U+0085).
pub const NOT_BLANK: &str =
    "[^\t\n\u{b}\u{c}\r \u{85}\u{a0}\u{1680}\u{2000}-\u{200a}\u{2028}\u{2029}\u{202f}\u{205f}\u{3000}]";
