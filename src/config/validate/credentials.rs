//! Validation of an account's client assertion (`private_key_jwt`, `client_secret_jwt`):
//! which keys each method needs and refuses, the private key parsed and its algorithm
//! matched now, the ready-made assertion's file read once to prove it is there.

use std::ops::Range;

use toml::Spanned;

use super::Validator;
use crate::config::raw::{RawAccount, RawGrant, RawSecret};
use crate::config::{AssertionSource, ClientAssertion, ClientAuth};

impl Validator<'_> {
    /// The assertion `auth` makes, if it makes one; every key that does not fit the
    /// method is reported where it is written.
    pub(super) fn client_assertion(
        &mut self,
        raw: &RawAccount,
        auth: ClientAuth,
        account_span: &Range<usize>,
        k: &dyn Fn(&str) -> String,
    ) -> Option<ClientAssertion> {
        let written: [(&str, Option<Range<usize>>); 5] = [
            ("private_key", raw.private_key.as_ref().map(Spanned::span)),
            (
                "client_assertion",
                raw.client_assertion.as_ref().map(Spanned::span),
            ),
            ("key_id", raw.key_id.as_ref().map(Spanned::span)),
            ("signing_alg", raw.signing_alg.as_ref().map(Spanned::span)),
            (
                "assertion_audience",
                raw.assertion_audience.as_ref().map(Spanned::span),
            ),
        ];
        let refuse = |v: &mut Self, keys: &[&str], why: &str| {
            for (key, span) in &written {
                if let (true, Some(span)) = (keys.contains(key), span) {
                    v.report(span.clone(), k(key), format!("`{key}` {why}"));
                }
            }
        };
        let source = match auth {
            // The jwt_bearer grant signs with these keys (`bearer`).
            ClientAuth::ClientSecretPost
            | ClientAuth::ClientSecretBasic
            | ClientAuth::TlsClientAuth
            | ClientAuth::SelfSignedTlsClientAuth
                if raw.grant == RawGrant::JwtBearer =>
            {
                refuse(
                    self,
                    &["client_assertion"],
                    "is for client_auth = \"private_key_jwt\": the jwt_bearer grant signs its own assertion with credentials_file or private_key",
                );
                return None;
            }
            ClientAuth::ClientSecretPost
            | ClientAuth::ClientSecretBasic
            | ClientAuth::TlsClientAuth
            | ClientAuth::SelfSignedTlsClientAuth => {
                let why = format!(
                    "is for client_auth = \"private_key_jwt\" or \"client_secret_jwt\", not \"{}\"",
                    auth.as_str()
                );
                let all = [
                    "private_key",
                    "client_assertion",
                    "key_id",
                    "signing_alg",
                    "assertion_audience",
                ];
                refuse(self, &all, &why);
                return None;
            }
            ClientAuth::ClientSecretJwt => {
                refuse(
                    self,
                    &["private_key", "client_assertion"],
                    "is for client_auth = \"private_key_jwt\" (client_secret_jwt signs with client_secret)",
                );
                if raw.client_secret.is_none() {
                    self.report(
                        account_span.clone(),
                        k("client_secret"),
                        "client_auth = \"client_secret_jwt\" needs a client_secret (the HS256 key)",
                    );
                }
                if let Some(alg) = &raw.signing_alg
                    && alg.get_ref() != "HS256"
                {
                    self.report(
                        alg.span(),
                        k("signing_alg"),
                        "client_secret_jwt signs with HS256 only",
                    );
                }
                AssertionSource::ClientSecret {
                    key_id: self.non_empty(raw.key_id.as_ref(), &k("key_id")),
                }
            }
            ClientAuth::PrivateKeyJwt => {
                if raw.client_secret.is_some() {
                    self.warnings.push(format!(
                        "{}: private_key_jwt sends no client secret; this one is unused",
                        k("client_secret")
                    ));
                }
                match (&raw.private_key, &raw.client_assertion) {
                    (Some(key), None) => self.private_key(raw, key, k)?,
                    (None, Some(file)) => {
                        refuse(
                            self,
                            &["key_id", "signing_alg", "assertion_audience"],
                            "does not apply to a ready-made client_assertion, which is sent as it is",
                        );
                        self.assertion_file(file, &k("client_assertion"))?
                    }
                    (Some(_), Some(file)) => {
                        self.report(file.span(), k("client_assertion"), "set private_key (tokend signs) or client_assertion (ready-made), not both");
                        return None;
                    }
                    (None, None) => {
                        self.report(account_span.clone(), k("private_key"), "client_auth = \"private_key_jwt\" needs private_key = { file = \"…\" } (or a ready-made client_assertion = { file = \"…\" })");
                        return None;
                    }
                }
            }
        };
        let audience = self.non_empty(raw.assertion_audience.as_ref(), &k("assertion_audience"));
        Some(ClientAssertion { source, audience })
    }

    /// `private_key`, parsed now, with `key_id` and `signing_alg`.
    fn private_key(
        &mut self,
        raw: &RawAccount,
        key: &Spanned<RawSecret>,
        k: &dyn Fn(&str) -> String,
    ) -> Option<AssertionSource> {
        let alg = match &raw.signing_alg {
            Some(_) => Some(self.signing_alg(raw, k)?),
            None => None,
        };
        let key_id = self.non_empty(raw.key_id.as_ref(), &k("key_id"));
        let pem = self.secret(key, &k("private_key"))?;
        let key = self.signing_key(&pem, alg, key.span(), &k("private_key"))?;
        Some(AssertionSource::PrivateKey { key, key_id })
    }

    /// `client_assertion`: a file only (its issuer replaces it), read once now so a
    /// wrong path is reported at load, with its mode checked like any secret file.
    fn assertion_file(&mut self, raw: &Spanned<RawSecret>, key: &str) -> Option<AssertionSource> {
        let RawSecret::File(path) = raw.get_ref() else {
            self.report(raw.span(), key, "must be { file = \"…\" }: a ready-made assertion expires, so tokend reads it again at every request");
            return None;
        };
        self.secret(raw, key)?;
        Some(AssertionSource::File(self.secret_path(path)))
    }

    fn non_empty(&mut self, raw: Option<&Spanned<String>>, key: &str) -> Option<String> {
        let raw = raw?;
        let v = raw.get_ref().trim();
        if v.is_empty() {
            self.report(raw.span(), key, "must not be empty (leave it out instead)");
            return None;
        }
        Some(v.to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use crate::config::test_env::{ec_key_pem, env};
    use crate::config::{AccountName, AssertionSource, Config, ConfigError};
    use crate::signing::SigningAlg;

    const BASE: &str = "[accounts.a]\ngrant = \"client_credentials\"\ntoken_url = \"https://x/t\"\nclient_id = \"c\"\n";

    /// Loads `BASE` + `rest` with an EC P-256 key at /etc/tokend/ec.pem and an
    /// assertion at /run/azure/token.
    fn load(rest: &str) -> Result<Config, ConfigError> {
        let mut e = env();
        e.files
            .insert(PathBuf::from("/etc/tokend/ec.pem"), ec_key_pem());
        e.files.insert(
            PathBuf::from("/etc/tokend/locked.pem"),
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIF\n-----END ENCRYPTED PRIVATE KEY-----\n"
                .into(),
        );
        e.files
            .insert(PathBuf::from("/run/azure/token"), "eyJ.eyJ.sig\n".into());
        Config::from_str_at(
            &format!("{BASE}{rest}"),
            Path::new("/etc/tokend/tokend.toml"),
            &e,
        )
    }

    fn keys(err: &ConfigError) -> Vec<&str> {
        err.problems.iter().map(|p| p.key.as_str()).collect()
    }

    #[test]
    fn a_private_key_is_parsed_at_load_and_needs_no_client_secret() {
        let c = load("client_auth = \"private_key_jwt\"\nprivate_key = { file = \"ec.pem\" }\nkey_id = \"k1\"\nassertion_audience = \"https://x\"\n").unwrap();
        let a = &c.accounts[&AccountName::parse("a").unwrap()];
        let assertion = a.assertion.as_ref().unwrap();
        assert_eq!(assertion.audience.as_deref(), Some("https://x"));
        let AssertionSource::PrivateKey { key, key_id } = &assertion.source else {
            panic!("a private key expected")
        };
        assert_eq!(key.alg(), SigningAlg::Es256);
        assert_eq!(key_id.as_deref(), Some("k1"));
        assert!(
            !format!("{c:?}").contains("BEGIN"),
            "Debug never shows the key"
        );
        assert!(c.secret_sources.contains_key("accounts.a.private_key"));

        let c = load("client_auth = \"private_key_jwt\"\nclient_assertion = { file = \"/run/azure/token\" }\n").unwrap();
        let a = &c.accounts[&AccountName::parse("a").unwrap()];
        let source = &a.assertion.as_ref().unwrap().source;
        assert_eq!(*source, AssertionSource::File("/run/azure/token".into()));
    }

    #[test]
    fn each_method_refuses_what_it_cannot_use_by_key() {
        let cases: &[(&str, &[&str], &str)] = &[
            (
                "client_auth = \"private_key_jwt\"\n",
                &["accounts.a.private_key"],
                "needs private_key",
            ),
            (
                "client_auth = \"private_key_jwt\"\nprivate_key = { file = \"ec.pem\" }\nsigning_alg = \"RS256\"\n",
                &["accounts.a.private_key"],
                "use ES256",
            ),
            (
                "client_auth = \"private_key_jwt\"\nprivate_key = { file = \"locked.pem\" }\n",
                &["accounts.a.private_key"],
                "passphrase",
            ),
            (
                "client_auth = \"private_key_jwt\"\nprivate_key = { file = \"ec.pem\" }\nclient_assertion = { file = \"/run/azure/token\" }\n",
                &["accounts.a.client_assertion"],
                "not both",
            ),
            (
                "client_auth = \"private_key_jwt\"\nclient_assertion = { env = \"X\" }\n",
                &["accounts.a.client_assertion"],
                "reads it again",
            ),
            (
                "client_auth = \"private_key_jwt\"\nclient_assertion = { file = \"/run/azure/token\" }\nkey_id = \"k\"\n",
                &["accounts.a.key_id"],
                "sent as it is",
            ),
            (
                "client_auth = \"client_secret_jwt\"\n",
                &["accounts.a.client_secret"],
                "HS256 key",
            ),
            (
                "client_secret = \"s\"\nprivate_key = { file = \"ec.pem\" }\n",
                &["accounts.a.private_key"],
                "not \"client_secret_post\"",
            ),
        ];
        for (rest, want, says) in cases {
            let err = load(rest).unwrap_err();
            assert_eq!(keys(&err), *want, "{rest}: {err}");
            assert!(err.to_string().contains(says), "{rest}: {err}");
            assert!(!err.to_string().contains("MIIF"), "{err}");
        }
    }

    #[test]
    fn the_shipped_assertion_examples_are_valid() {
        let mut e = env();
        e.files
            .insert(PathBuf::from("/etc/tokend/okta.pem"), ec_key_pem());
        e.files.insert(
            PathBuf::from("/var/run/secrets/azure/tokens/azure-identity-token"),
            "eyJ.eyJ.sig".into(),
        );
        e.vars.insert("SERVICE_CLIENT_SECRET".into(), "s".into());
        for (name, text) in [
            (
                "okta-private-key-jwt.toml",
                include_str!("../../../config/okta-private-key-jwt.toml"),
            ),
            (
                "entra-federated.toml",
                include_str!("../../../config/entra-federated.toml"),
            ),
            (
                "client-secret-jwt.toml",
                include_str!("../../../config/client-secret-jwt.toml"),
            ),
        ] {
            let c = Config::from_str_at(text, Path::new(name), &e)
                .unwrap_or_else(|err| panic!("config/{name}: {err}"));
            let a = c.accounts.values().next().unwrap();
            assert!(a.assertion.is_some(), "{name}");
        }
    }
}
