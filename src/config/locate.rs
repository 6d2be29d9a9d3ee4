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
        self.problem(span, key, with_suggestion(e.message().trim()))
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

/// serde's "unknown field `X`, expected one of `a`, `b`" (or "unknown variant …") with
/// the closest allowed name instead of the whole list, when one is close enough to be
/// the intended one; otherwise the message as it is.
fn with_suggestion(message: &str) -> String {
    let Some(kind) = ["unknown field", "unknown variant"]
        .into_iter()
        .find(|k| message.starts_with(k))
    else {
        return message.to_string();
    };
    // Backticked names: the unknown one first, then the allowed ones.
    let mut names = message.split('`').skip(1).step_by(2);
    let Some(unknown) = names.next() else {
        return message.to_string();
    };
    match closest(unknown, names) {
        Some(near) => format!("{kind} `{unknown}`; did you mean `{near}`?"),
        None => message.to_string(),
    }
}

/// The candidate nearest to `word` by edit distance (case and `-`/`_` ignored), if it is
/// within a third of the word's length (at least one edit).
fn closest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let norm = |s: &str| -> Vec<char> {
        s.chars()
            .map(|c| {
                if c == '-' {
                    '_'
                } else {
                    c.to_ascii_lowercase()
                }
            })
            .collect()
    };
    let w = norm(word);
    let limit = (w.len() / 3).max(1);
    candidates
        .map(|c| (edit_distance(&w, &norm(c)), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Optimal string alignment distance: insertions, deletions, substitutions and swaps of
/// two neighbours (`client_sercet`) each cost one.
fn edit_distance(a: &[char], b: &[char]) -> usize {
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut d = (rows[i - 1][j] + 1)
                .min(rows[i][j - 1] + 1)
                .min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = d;
        }
    }
    rows[a.len()][b.len()]
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
        assert_eq!(
            p.message,
            "unknown field `client_sercet`; did you mean `client_secret`?"
        );
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

    #[test]
    fn unknown_keys_get_the_nearest_allowed_key_at_their_place() {
        let message = |text: &str| load(text).unwrap_err().problems[0].message.clone();
        let account = "[accounts.a]\ngrant = \"client_credentials\"\ntoken_url = \"https://x/t\"\nclient_id = \"c\"\nclient_secret = \"s\"\n";
        // A top-level section.
        assert_eq!(
            message("[acounts.a]\ngrant = \"client_credentials\"\n"),
            "unknown field `acounts`; did you mean `accounts`?"
        );
        // An account key, a nested table's key, a table in an array, a secret's form.
        assert_eq!(
            message(&format!("{account}Token_URL = \"https://y/t\"\n")),
            "unknown field `Token_URL`; did you mean `token_url`?"
        );
        assert_eq!(
            message(&format!(
                "{account}[accounts.a.refresh]\nmin-interval = \"5s\"\n"
            )),
            "unknown field `min-interval`; did you mean `min_interval`?"
        );
        assert_eq!(
            message(&format!(
                "{account}[[accounts.a.sinks]]\npath = \"/t\"\nmdoe = \"0600\"\n"
            )),
            "unknown field `mdoe`; did you mean `mode`?"
        );
        assert_eq!(
            message("[state]\nencryption_key = { fiel = \"k\" }\n"),
            "unknown field `fiel`; did you mean `file`?"
        );
        // Nothing close: the list of what is allowed stays.
        let far = message(&format!("{account}colour = \"blue\"\n"));
        assert!(
            far.starts_with("unknown field `colour`, expected one of `grant`"),
            "{far}"
        );
    }

    #[test]
    fn edit_distance_counts_a_swap_as_one() {
        let d = |a: &str, b: &str| {
            edit_distance(
                &a.chars().collect::<Vec<_>>(),
                &b.chars().collect::<Vec<_>>(),
            )
        };
        assert_eq!(d("client_sercet", "client_secret"), 1);
        assert_eq!(d("", "abc"), 3);
        assert_eq!(d("kitten", "sitting"), 3);
        assert_eq!(closest("zzz", ["grant", "scope"].into_iter()), None);
    }
}
