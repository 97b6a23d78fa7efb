//! Configuration errors. Every error about the content of a file names the
//! file, the line and column, and the key (`bootstrap.hosts[3].parent`).

use std::fmt;
use std::path::PathBuf;

use crate::hostlist::HostlistError;

/// A place in a configuration file: `file:line:column`, 1-based.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Location {
    pub file: PathBuf,
    pub line: u32,
    pub column: u32,
}

impl Location {
    /// The location of byte `offset` in `text`, which was read from `file`.
    pub(crate) fn at(file: &std::path::Path, text: &str, offset: usize) -> Location {
        let offset = offset.min(text.len());
        // step back to a char boundary so slicing cannot panic
        let mut offset = offset;
        while !text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &text[..offset];
        let line = saturate(before.matches('\n').count() + 1);
        let line_start = before.rfind('\n').map_or(0, |p| p + 1);
        let column = saturate(before[line_start..].chars().count() + 1);
        Location {
            file: file.to_path_buf(),
            line,
            column,
        }
    }
}

fn saturate(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}; check that it exists and that the broker's user can read it", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is writable by group or others (mode {mode:04o}); run `chmod go-w {}` and make sure it is owned by root or the broker's user", path.display(), path.display())]
    InsecurePermissions { path: PathBuf, mode: u32 },
    /// Owned by someone else, or reached through a directory or symlink
    /// that someone else controls (OpenSSH `StrictModes`).
    #[error("configuration refused: {0}")]
    Untrusted(#[from] canopy_security::trust::TrustError),
    #[error("{} has no *.toml files; put the configuration in e.g. {}/canopy.toml", dir.display(), dir.display())]
    NoConfigFiles { dir: PathBuf },
    #[error("{at}: {key}: {message}; fix the TOML syntax (see docs/config.md)")]
    Syntax {
        at: Location,
        key: String,
        message: String,
    },
    #[error("{at}: {key}: {message}; see docs/config.md for the expected type")]
    BadType {
        at: Location,
        key: String,
        message: String,
    },
    #[error("{at}: unknown key `{key}`; remove it or fix its spelling (expected {expected})")]
    UnknownKey {
        at: Location,
        key: String,
        expected: String,
    },
    #[error("{at}: missing key `{key}`; {hint}")]
    MissingKey {
        at: Location,
        key: String,
        hint: String,
    },
    #[error("{at}: `{key}` is already set at {first}; set it in one file only")]
    DuplicateKey {
        at: Location,
        key: String,
        first: Location,
    },
    #[error("{at}: {key}: host `{host}` is already listed at {first}{why}; list each host once")]
    DuplicateHost {
        at: Location,
        key: String,
        host: String,
        first: Box<Location>,
        why: String,
    },
    #[error("{at}: {key}: bad hostlist {value:?}: {source}")]
    BadHostlist {
        at: Location,
        key: String,
        value: String,
        source: Box<HostlistError>,
    },
    #[error("{at}: {key}: parent `{parent}` is not in bootstrap.hosts; add it to the list or fix the name")]
    UnknownParent {
        at: Location,
        key: String,
        parent: String,
    },
    #[error("{at}: {key}: `{host}` is rank 0, the root of the tree, and cannot have a parent; remove `parent` or list another host first")]
    RootHasParent {
        at: Location,
        key: String,
        host: String,
    },
    #[error("{at}: {key}: parents form a cycle ({cycle}); every chain of parents must end at rank 0 ({root})")]
    ParentCycle {
        at: Location,
        key: String,
        cycle: String,
        root: String,
    },
    #[error("{at}: {key}: mechanism is \"gssapi\" but there is no [gssapi] table; add [gssapi] (service, keytab, realm) or use mechanism = \"curve\"")]
    MissingGssapi { at: Location, key: String },
    #[error("{at}: {key}: port {port} is out of range; use a port from 1 to 65535")]
    BadPort {
        at: Location,
        key: String,
        port: i64,
    },
    #[error("{at}: {key}: unknown token `{token}` in {value:?}; {key} may use {allowed}, and `%%` for a literal '%'")]
    BadToken {
        at: Location,
        key: String,
        token: String,
        value: String,
        allowed: &'static str,
    },
    #[error("{at}: {key}: {message}")]
    Invalid {
        at: Location,
        key: String,
        message: String,
    },
}

impl ConfigError {
    /// Where in which file the error is, when it is about file content.
    pub fn location(&self) -> Option<&Location> {
        match self {
            ConfigError::Io { .. }
            | ConfigError::InsecurePermissions { .. }
            | ConfigError::Untrusted(_)
            | ConfigError::NoConfigFiles { .. } => None,
            ConfigError::Syntax { at, .. }
            | ConfigError::BadType { at, .. }
            | ConfigError::UnknownKey { at, .. }
            | ConfigError::MissingKey { at, .. }
            | ConfigError::DuplicateKey { at, .. }
            | ConfigError::DuplicateHost { at, .. }
            | ConfigError::BadHostlist { at, .. }
            | ConfigError::UnknownParent { at, .. }
            | ConfigError::RootHasParent { at, .. }
            | ConfigError::ParentCycle { at, .. }
            | ConfigError::MissingGssapi { at, .. }
            | ConfigError::BadPort { at, .. }
            | ConfigError::BadToken { at, .. }
            | ConfigError::Invalid { at, .. } => Some(at),
        }
    }

    /// The dotted key the error is about (`bootstrap.hosts[2].host`).
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Io { .. }
            | ConfigError::InsecurePermissions { .. }
            | ConfigError::Untrusted(_)
            | ConfigError::NoConfigFiles { .. } => None,
            ConfigError::Syntax { key, .. }
            | ConfigError::BadType { key, .. }
            | ConfigError::UnknownKey { key, .. }
            | ConfigError::MissingKey { key, .. }
            | ConfigError::DuplicateKey { key, .. }
            | ConfigError::DuplicateHost { key, .. }
            | ConfigError::BadHostlist { key, .. }
            | ConfigError::UnknownParent { key, .. }
            | ConfigError::RootHasParent { key, .. }
            | ConfigError::ParentCycle { key, .. }
            | ConfigError::MissingGssapi { key, .. }
            | ConfigError::BadPort { key, .. }
            | ConfigError::BadToken { key, .. }
            | ConfigError::Invalid { key, .. } => Some(key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_counts_lines_and_chars() {
        let text = "a = 1\nbé = 2\n";
        let p = std::path::Path::new("x.toml");
        let l = Location::at(p, text, 0);
        assert_eq!((l.line, l.column), (1, 1));
        let off = text.find('=').unwrap();
        assert_eq!(Location::at(p, text, off).column, 3);
        let off2 = text.rfind('=').unwrap();
        let l2 = Location::at(p, text, off2);
        assert_eq!((l2.line, l2.column), (2, 4));
        assert_eq!(l2.to_string(), "x.toml:2:4");
        // past the end or mid-character never panics
        let _ = Location::at(p, text, 1000);
        let _ = Location::at(p, text, text.find('é').unwrap() + 1);
    }
}
