//! The command line's own parts: what a library user would not want (a
//! terminal display).

pub mod progress;
