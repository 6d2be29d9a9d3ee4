//! Where a config problem is: [`ConfigError`] and [`Problem`] (`file:line:column: key:
//! message`), and the `Locator` that recovers those places from the config text.

use std::fmt;
use std::ops::Range;

/// Every problem found in a config, each with its place.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// One problem: `file:line:column: key: message`.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            // Not about a place in the file (it could not be read at all).
            write!(f, "{}: ", self.file)?;
        } else {
            write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        }
        if !self.key.is_empty() {
            write!(f, "key `{}`: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

/// Turns byte offsets in the config text into places: line, column and key path.
pub(super) struct Locator<'a> {
    file: String,
    text: &'a str,
}

impl<'a> Locator<'a> {
    /// `file` names the config in every problem; `text` is what was parsed.
    pub(super) fn new(file: String, text: &'a str) -> Self {
        Locator { file, text }
    }
    fn line_col(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        (line, before[line_start..].chars().count() + 1)
    }

    pub(super) fn problem(
        &self,
        span: Range<usize>,
        key: impl Into<String>,
        msg: impl Into<String>,
    ) -> Problem {
        let (line, column) = self.line_col(span.start);
        Problem {
            file: self.file.clone(),
            line,
            column,
            key: key.into(),
            message: msg.into(),
        }
    }

    /// A TOML or shape error: toml gives a span and a message; the key is recovered from
    /// the text (the table header above the span, and the key on the span's line).
    pub(super) fn parse_problem(&self, e: &toml::de::Error) -> Problem {
        let span = e.span().unwrap_or(0..0);
        let key = self.key_at(span.start);
        self.problem(span, key, e.message().trim().to_string())
    }

    fn key_at(&self, offset: usize) -> String {
        let offset = offset.min(self.text.len());
        let line_start = self.text[..offset].rfind('\n').map_or(0, |i| i + 1);
        let line_end = self.text[offset..]
            .find('\n')
            .map_or(self.text.len(), |i| offset + i);
        let line = &self.text[line_start..line_end];
        let trimmed = line.trim();
        let mut table = String::new();
        let mut leaf = String::new();
        // Only a closed header names a table: an unclosed one may run into a value.
        if trimmed.starts_with('[') && trimmed.ends_with(']') {
            table = trimmed
                .trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_string();
        } else {
            if let Some(eq) = line.find('=') {
                leaf = line[..eq].trim().to_string();
            }
            for prev in self.text[..line_start].lines().rev() {
                let p = prev.trim();
                if p.starts_with('[') && p.ends_with(']') {
                    table = p.trim_matches(|c| c == '[' || c == ']').trim().to_string();
                    break;
                }
            }
        }
        // Only what looks like a key path survives: a broken line may hold a value, and
        // values may be secrets.
        let table = key_path_prefix(&table);
        let leaf = key_path_prefix(&leaf);
        match (table.is_empty(), leaf.is_empty()) {
            (_, true) => table,
            (true, false) => leaf,
            (false, false) => format!("{table}.{leaf}"),
        }
    }
}

/// The leading part of `text` that can be a dotted TOML key (bare or quoted parts).
fn key_path_prefix(text: &str) -> String {
    let text = text.trim();
    let end = text
        .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '"')))
        .unwrap_or(text.len());
    text[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_env::load;

    #[test]
    fn the_key_is_recovered_from_the_text_but_never_a_value() {
        let text = "[accounts.a]\nclient_secret = \"s3cret\"\n[accounts.b\nx = 1\n";
        let loc = Locator::new("f".into(), text);
        let at = |needle: &str| loc.key_at(text.find(needle).unwrap());
        assert_eq!(at("[accounts.a]"), "accounts.a");
        assert_eq!(at("s3cret"), "accounts.a.client_secret");
        // An unclosed header names no table: the one above stands.
        assert_eq!(at("[accounts.b"), "accounts.a");
        assert_eq!(at("x = 1"), "accounts.a.x");
        assert_eq!(
            key_path_prefix("  \"quoted\".key = \"v\""),
            "\"quoted\".key"
        );
    }

    #[test]
    fn an_unknown_key_names_file_line_column_and_key() {
        let text = "[accounts.a]\ngrant = \"client_credentials\"\ntoken_url = \"https://x/t\"\nclient_id = \"c\"\nclient_secret = \"s\"\nclient_sercet = \"typo\"\n";
        let err = load(text).unwrap_err();
        let p = &err.problems[0];
        assert_eq!((p.line, p.column), (6, 1), "{err}");
        assert_eq!(p.key, "accounts.a.client_sercet");
        assert!(p.message.contains("unknown field"), "{err}");
        assert!(
            err.to_string()
                .starts_with("/etc/tokend/tokend.toml:6:1: key `accounts.a.client_sercet`"),
            "{err}"
        );
    }

    #[test]
    fn a_wrong_enum_value_is_located() {
        let text =
            "[accounts.a]\ngrant = \"password\"\ntoken_url = \"https://x/t\"\nclient_id = \"c\"\n";
        let err = load(text).unwrap_err();
        assert_eq!(err.problems[0].line, 2, "{err}");
        assert_eq!(err.problems[0].key, "accounts.a.grant");
    }
}
