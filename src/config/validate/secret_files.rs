//! Who else may read the files secrets come from: `{ file = … }` secrets readable by group
//! or others are warned about, an encryption key readable by others is refused. Files in
//! systemd's credentials directory are the service's own and pass as they are.

use std::ops::Range;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::Validator;

/// The keys whose secret is the state's encryption key: a copy readable by others undoes
/// the encryption, so it is refused rather than warned about.
const ENCRYPTION_KEYS: &[&str] = &["state.encryption_key", "state.previous_encryption_keys"];

impl Validator<'_> {
    /// Checks the mode of the file that `key`'s secret was read from (at `path`).
    pub(super) fn check_secret_file(&mut self, span: Range<usize>, key: &str, path: &Path) {
        if let Some(creds) = self.env.var("CREDENTIALS_DIRECTORY")
            && path.starts_with(&creds)
        {
            return;
        }
        let Ok(meta) = std::fs::metadata(path) else {
            // Read through the environment but not on this disk (a test's), or gone
            // since: the read itself is what counts.
            return;
        };
        let mode = meta.permissions().mode() & 0o777;
        let who = match (mode & 0o040 != 0, mode & 0o004 != 0) {
            (false, false) => return,
            (true, false) => "its group",
            (false, true) => "other users",
            (true, true) => "its group and other users",
        };
        let shown = path.display();
        if ENCRYPTION_KEYS.contains(&key) && mode & 0o004 != 0 {
            self.report(
                span,
                key,
                format!(
                    "the key file {shown} is readable by {who} (mode {mode:03o}), which undoes the encryption: chmod 600 {shown}"
                ),
            );
        } else {
            self.warnings.push(format!(
                "{key}: the secret file {shown} is readable by {who} (mode {mode:03o}): chmod 600 {shown}"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    use crate::config::{Config, ConfigError, SystemEnvironment};

    const HEX_KEY: &str = "abababababababababababababababababababababababababababababababab";

    /// A config whose client secret and encryption key are files of the given modes, in
    /// a temp dir; with `creds`, the dir is `$CREDENTIALS_DIRECTORY`.
    fn load(secret_mode: u32, key_mode: u32, creds: bool) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str, mode: u32| {
            let path = dir.path().join(name);
            fs::write(&path, text).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            path
        };
        let secret = write("client-secret", "cs-value", secret_mode);
        let key = write("state-key", HEX_KEY, key_mode);
        let text = format!(
            "[state]\nencryption_key = {{ file = \"{}\" }}\n[accounts.a]\ngrant = \"client_credentials\"\ntoken_url = \"https://x/t\"\nclient_id = \"c\"\nclient_secret = {{ file = \"{}\" }}\n",
            key.display(),
            secret.display()
        );
        struct Creds<'a>(&'a Path);
        impl crate::config::Environment for Creds<'_> {
            fn var(&self, name: &str) -> Option<String> {
                (name == "CREDENTIALS_DIRECTORY").then(|| self.0.display().to_string())
            }
            fn read_file(&self, path: &Path) -> std::io::Result<String> {
                fs::read_to_string(path)
            }
        }
        let config = dir.path().join("tokend.toml");
        if creds {
            Config::from_str_at(&text, &config, &Creds(dir.path()))
        } else {
            Config::from_str_at(&text, &config, &SystemEnvironment)
        }
    }

    #[test]
    fn private_secret_files_pass_silently() {
        let c = load(0o600, 0o400, false).unwrap();
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn secret_files_readable_by_group_or_others_are_warned_about() {
        for (mode, who) in [
            (0o640, "its group (mode 640)"),
            (0o604, "other users (mode 604)"),
            (0o644, "its group and other users (mode 644)"),
        ] {
            let c = load(mode, 0o600, false).unwrap();
            let [w] = c.warnings.as_slice() else {
                panic!("one warning for mode {mode:o}: {:?}", c.warnings);
            };
            assert!(
                w.starts_with("accounts.a.client_secret: the secret file "),
                "{w}"
            );
            assert!(
                w.contains(&format!("client-secret is readable by {who}")),
                "{w}"
            );
            assert!(w.ends_with("client-secret"), "the fix names the file: {w}");
            assert!(w.contains(": chmod 600 "), "{w}");
            assert!(!w.contains("cs-value"), "{w}");
        }
    }

    #[test]
    fn an_encryption_key_readable_by_others_is_refused_by_its_group_warned_about() {
        let err = load(0o600, 0o644, false).unwrap_err();
        let [p] = err.problems.as_slice() else {
            panic!("one problem: {err}");
        };
        assert_eq!(
            (p.key.as_str(), p.line),
            ("state.encryption_key", 2),
            "{err}"
        );
        assert!(
            p.message
                .contains("state-key is readable by its group and other users (mode 644)"),
            "{err}"
        );
        assert!(!err.to_string().contains(HEX_KEY));
        let c = load(0o600, 0o640, false).unwrap();
        assert!(
            c.warnings.len() == 1 && c.warnings[0].starts_with("state.encryption_key: "),
            "{:?}",
            c.warnings
        );
    }

    #[test]
    fn systemd_credentials_are_fine_as_they_are() {
        let c = load(0o644, 0o644, true).unwrap();
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }
}
