//! Where the client commands find the daemon and what they show it: the endpoint
//! (`--endpoint`, `$TOKEND_ENDPOINT`, the config's first `server.listen`, the default),
//! the consumer key (`--key-file`, else a consumer's key in the config) and, for `reload`,
//! the state directory. Only those keys are read: the config need not be valid.

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::client::DaemonClient;
use super::remote::CommandError;
use crate::config::{DEFAULT_LISTEN, DEFAULT_STATE_DIR};

/// The config file a command reads, and what named it (`None`: the default path).
#[derive(Debug)]
pub struct ConfigFile {
    pub path: PathBuf,
    pub named: Option<&'static str>,
}

/// Where an endpoint given outside the config came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Flag,
    Env,
}

/// How a client command reaches the daemon.
#[derive(Debug)]
pub struct Target {
    pub endpoint: Option<(String, Origin)>,
    pub key_file: Option<PathBuf>,
    pub config: ConfigFile,
}

/// The config as a client reads it: its TOML, or why there is none.
#[derive(Default)]
struct Read {
    table: Option<toml::Table>,
    /// Why there is no table: no file at the default path, or one that cannot be read.
    missing: Option<String>,
}

impl Target {
    /// A client of the daemon that sends the key of a consumer that may read `account`
    /// (every account, for `None`), and names where its endpoint came from.
    pub fn client(&self, account: Option<&str>) -> Result<DaemonClient, CommandError> {
        let config = if self.endpoint.is_none() || self.key_file.is_none() {
            self.read()?
        } else {
            Read::default()
        };
        let (endpoint, origin) = self.endpoint(&config);
        let client = DaemonClient::new(&endpoint, self.key_file.as_deref())?.with_origin(&origin);
        if self.key_file.is_some() {
            return Ok(client);
        }
        match consumer_key(config.table.as_ref(), &self.config.path, account) {
            Some((key, what)) => Ok(client.with_key(&key, &what)?),
            None => Ok(client),
        }
    }

    /// The endpoint and where it came from, as messages name it.
    fn endpoint(&self, config: &Read) -> (String, String) {
        match &self.endpoint {
            Some((e, Origin::Flag)) => return (e.clone(), "from --endpoint".into()),
            Some((e, Origin::Env)) => return (e.clone(), "from $TOKEND_ENDPOINT".into()),
            None => {}
        }
        let path = self.config.path.display();
        let listen = config.table.as_ref().and_then(|t| {
            let first = t.get("server")?.get("listen")?.as_array()?.first()?;
            first.as_str().map(str::to_string)
        });
        let default = format!("http://{DEFAULT_LISTEN}");
        match (listen, &config.missing) {
            (Some(l), _) if l.starts_with("unix:") => (l, format!("server.listen of {path}")),
            (Some(l), _) => (format!("http://{l}"), format!("server.listen of {path}")),
            (None, Some(why)) => (default, format!("the default: {why}")),
            (None, None) => (default, format!("the default: {path} has no server.listen")),
        }
    }

    /// The daemon's state directory (where its lock names its pid) and where that came
    /// from: `state.dir` of the config, `$STATE_DIRECTORY`, or the default, as `run`
    /// finds it.
    pub fn state_dir(&self) -> Result<(PathBuf, String), CommandError> {
        let config = self.read()?;
        let path = &self.config.path;
        let dir = config
            .table
            .as_ref()
            .and_then(|t| t.get("state")?.get("dir")?.as_str().map(PathBuf::from));
        if let Some(dir) = dir {
            let base = path.parent().unwrap_or(Path::new(""));
            return Ok((base.join(dir), format!("state.dir of {}", path.display())));
        }
        let systemd = std::env::var("STATE_DIRECTORY")
            .ok()
            .and_then(|s| s.split(':').next().map(PathBuf::from))
            .filter(|d| !d.as_os_str().is_empty());
        Ok(match systemd {
            Some(dir) => (dir, "from $STATE_DIRECTORY".into()),
            None => (PathBuf::from(DEFAULT_STATE_DIR), "the default".into()),
        })
    }

    /// The config's TOML. A config named by `--config` or `$TOKEND_CONFIG` must be
    /// readable; the default one may be missing or unreadable (the defaults apply).
    fn read(&self) -> Result<Read, CommandError> {
        let path = &self.config.path;
        let problem = match std::fs::read_to_string(path) {
            Ok(text) => match toml::from_str::<toml::Table>(&text) {
                Ok(table) => {
                    return Ok(Read {
                        table: Some(table),
                        missing: None,
                    });
                }
                Err(e) => format!("is not valid TOML: {}", e.message().trim_end()),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.config.named.is_none() => {
                return Ok(Read {
                    table: None,
                    missing: Some(format!("no config at {}", path.display())),
                });
            }
            Err(e) => format!("cannot be read: {e}"),
        };
        match self.config.named {
            Some(by) => Err(CommandError::Config {
                path: path.clone(),
                named: by,
                problem,
            }),
            None => Ok(Read {
                table: None,
                missing: Some(format!("{} {problem}", path.display())),
            }),
        }
    }
}

/// The key of the first consumer (in name order) that may read `account` (every account
/// for `None`) and whose key this user can read, else the first readable key at all
/// (the daemon's 403 then says what that consumer may not read). With the key, where it
/// came from.
fn consumer_key(
    table: Option<&toml::Table>,
    config: &Path,
    account: Option<&str>,
) -> Option<(Zeroizing<String>, String)> {
    let consumers = table?.get("consumers")?.as_table()?;
    let mut names: Vec<&String> = consumers.keys().collect();
    names.sort();
    let mut fallback = None;
    for name in names {
        let consumer = &consumers[name];
        let Some(key) = consumer.get("key").and_then(|k| read_key(k, config)) else {
            continue;
        };
        let what = format!("consumer {name}'s key in {}", config.display());
        let accounts: Vec<&str> = consumer
            .get("accounts")
            .and_then(toml::Value::as_array)
            .map(|a| a.iter().filter_map(toml::Value::as_str).collect())
            .unwrap_or_default();
        if accounts.contains(&"*") || account.is_some_and(|a| accounts.contains(&a)) {
            return Some((key, what));
        }
        fallback.get_or_insert((key, what));
    }
    fallback
}

/// A consumer's `key` as written: a literal, `{ env = NAME }`, or `{ file = PATH }`
/// (relative: in systemd's credentials directory, else beside the config, as the daemon
/// looks). `None` when this user cannot read it.
fn read_key(value: &toml::Value, config: &Path) -> Option<Zeroizing<String>> {
    if let Some(literal) = value.as_str() {
        return Some(Zeroizing::new(literal.to_string()));
    }
    let table = value.as_table()?;
    if let Some(var) = table.get("env") {
        return std::env::var(var.as_str()?).ok().map(Zeroizing::new);
    }
    let file = Path::new(table.get("file")?.as_str()?);
    let credentials = std::env::var_os("CREDENTIALS_DIRECTORY")
        .filter(|_| file.is_relative())
        .map(|d| PathBuf::from(d).join(file));
    let beside = config.parent().unwrap_or(Path::new("")).join(file);
    credentials
        .into_iter()
        .chain([beside])
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(Zeroizing::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(dir: &Path, config: &str, named: Option<&'static str>) -> Target {
        let path = dir.join("tokend.toml");
        std::fs::write(&path, config).unwrap();
        Target {
            endpoint: None,
            key_file: None,
            config: ConfigFile { path, named },
        }
    }

    #[test]
    fn the_endpoint_comes_from_the_flag_the_config_or_the_default_and_says_which() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = target(dir.path(), "[server]\nlisten = [\"127.0.0.1:9\"]\n", None);
        let (e, origin) = t.endpoint(&t.read().unwrap());
        assert_eq!(e, "http://127.0.0.1:9");
        assert_eq!(
            origin,
            format!("server.listen of {}", t.config.path.display())
        );

        t.endpoint = Some(("http://127.0.0.1:7".into(), Origin::Env));
        assert_eq!(
            t.endpoint(&Read::default()),
            ("http://127.0.0.1:7".into(), "from $TOKEND_ENDPOINT".into())
        );

        let t = target(
            dir.path(),
            "[server]\nlisten = [\"unix:/run/t.sock\"]\n",
            None,
        );
        assert_eq!(t.endpoint(&t.read().unwrap()).0, "unix:/run/t.sock");

        // The default path may be missing; a named config may not.
        let t = Target {
            endpoint: None,
            key_file: None,
            config: ConfigFile {
                path: dir.path().join("none.toml"),
                named: None,
            },
        };
        let (e, origin) = t.endpoint(&t.read().unwrap());
        assert_eq!(e, format!("http://{DEFAULT_LISTEN}"));
        assert!(origin.starts_with("the default: no config at "), "{origin}");
        let named = Target {
            config: ConfigFile {
                named: Some("--config"),
                ..t.config
            },
            ..t
        };
        let e = named.read().err().expect("a named config must exist");
        assert!(
            e.to_string()
                .contains("none.toml (from --config) cannot be read"),
            "{e}"
        );

        let t = target(dir.path(), "[server\n", Some("$TOKEND_CONFIG"));
        let e = t.read().err().expect("not TOML");
        assert!(e.to_string().contains("is not valid TOML"), "{e}");
    }

    #[test]
    fn the_key_is_a_readable_one_of_a_consumer_that_may_read_the_account() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ops.key"), "k3y-ops\n").unwrap();
        let config = "[consumers.billing]\nkey = \"k3y-billing\"\naccounts = [\"zy\"]\n\
                      [consumers.hashed]\nkey_sha256 = \"00\"\naccounts = [\"*\"]\n\
                      [consumers.ops]\nkey = { file = \"ops.key\" }\naccounts = [\"*\"]\n\
                      [consumers.unset]\nkey = { env = \"TOKEND_TEST_NO_SUCH_VAR\" }\naccounts = [\"*\"]\n";
        let t = target(dir.path(), config, Some("--config"));
        let table = t.read().unwrap().table;
        let key = |account| {
            consumer_key(table.as_ref(), &t.config.path, account)
                .map(|(k, what)| (k.trim().to_string(), what))
        };
        let (k, what) = key(Some("zy")).unwrap();
        assert_eq!(k, "k3y-billing");
        assert!(what.starts_with("consumer billing's key in "), "{what}");
        assert_eq!(key(Some("cc")).unwrap().0, "k3y-ops");
        assert_eq!(key(None).unwrap().0, "k3y-ops");
        assert!(consumer_key(None, &t.config.path, None).is_none());
    }

    #[test]
    fn the_state_dir_is_found_as_the_daemon_finds_it() {
        let dir = tempfile::tempdir().unwrap();
        let t = target(dir.path(), "[state]\ndir = \"st\"\n", None);
        let (found, origin) = t.state_dir().unwrap();
        assert_eq!(found, dir.path().join("st"));
        assert!(origin.starts_with("state.dir of "), "{origin}");
    }
}
