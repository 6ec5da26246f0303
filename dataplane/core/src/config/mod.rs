//! Load balancer configuration: the validated runtime model ([`model`]) and the TOML front end
//! ([`parse`]) that turns a file into it, reporting every problem at once with its line.

pub mod model;
pub mod parse;

pub use model::*;
pub use parse::{ConfigError, ConfigErrors, load_file, load_file_with, load_str, load_str_with};

#[cfg(test)]
mod tests;
