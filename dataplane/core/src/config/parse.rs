//! TOML front end. (API skeleton: filled in by the config work.)
use super::model::LbConfig;

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Every problem found in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Parses and validates a configuration; `file` is used in error messages.
pub fn load_str(text: &str, file: &str) -> Result<LbConfig, ConfigErrors> {
    let _ = text;
    Err(ConfigErrors(vec![ConfigError {
        file: file.into(),
        line: 1,
        column: 1,
        message: "config parsing not implemented yet".into(),
    }]))
}

/// Reads and validates a configuration file.
pub fn load_file(path: &std::path::Path) -> Result<LbConfig, ConfigErrors> {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => load_str(&text, &file),
        Err(e) => Err(ConfigErrors(vec![ConfigError {
            file,
            line: 0,
            column: 0,
            message: format!("cannot read: {e}"),
        }])),
    }
}
