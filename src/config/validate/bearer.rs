//! Validation of the `jwt_bearer` grant's assertion (RFC 7523 §2.1): a Google
//! service-account key file (`credentials_file`), or `private_key` with
//! `assertion_issuer` and `assertion_subject`; the key parsed now, its file's mode checked.

use std::ops::Range;

use reqwest::Url;
use serde::Deserialize;
use toml::Spanned;
use zeroize::Zeroize;

use super::Validator;
use crate::config::raw::RawAccount;
use crate::config::{BearerAssertion, SecretSource};
use crate::secret::Secret;
use crate::signing::{SigningAlg, SigningKey};

/// The fields of a Google service-account key file tokend uses.
#[derive(Deserialize)]
struct ServiceAccountKey {
    #[serde(rename = "type")]
    kind: Option<String>,
    client_email: String,
    private_key: String,
    private_key_id: Option<String>,
    token_uri: Option<String>,
}

impl Validator<'_> {
    /// The grant's assertion, and the token endpoint a key file names (the default for
    /// `token_url`).
    pub(super) fn bearer_assertion(
        &mut self,
        raw: &RawAccount,
        account_span: &Range<usize>,
        k: &dyn Fn(&str) -> String,
    ) -> Option<(BearerAssertion, Option<Url>)> {
        let alg = self.signing_alg(raw, k);
        let subject = raw
            .assertion_subject
            .as_ref()
            .map(|s| s.get_ref().trim().to_string());
        let audience = raw
            .assertion_audience
            .as_ref()
            .map(|s| s.get_ref().trim().to_string());
        let key_id = raw.key_id.as_ref().map(|s| s.get_ref().trim().to_string());
        match (&raw.credentials_file, &raw.private_key) {
            (Some(file), None) => {
                if let Some(i) = &raw.assertion_issuer {
                    self.report(
                        i.span(),
                        k("assertion_issuer"),
                        "a credentials_file names the issuer itself (its client_email)",
                    );
                }
                let (sa, token_uri) = self.service_account(file, alg, &k("credentials_file"))?;
                let key_id = key_id.or(sa.key_id);
                Some((
                    BearerAssertion {
                        key_id,
                        subject,
                        audience,
                        ..sa
                    },
                    token_uri,
                ))
            }
            (None, Some(key)) => {
                let (Some(issuer), Some(_)) = (&raw.assertion_issuer, &subject) else {
                    self.report(account_span.clone(), k("assertion_issuer"), "grant = \"jwt_bearer\" with a private_key needs assertion_issuer and assertion_subject (RFC 7523 §3)");
                    return None;
                };
                let pem = self.secret(key, &k("private_key"))?;
                let key = self.signing_key(&pem, alg, key.span(), &k("private_key"))?;
                let issuer = issuer.get_ref().trim().to_string();
                Some((
                    BearerAssertion {
                        key,
                        key_id,
                        issuer,
                        subject,
                        audience,
                        scope_in_claim: false,
                    },
                    None,
                ))
            }
            (Some(file), Some(_)) => {
                self.report(
                    file.span(),
                    k("credentials_file"),
                    "set credentials_file or private_key, not both",
                );
                None
            }
            (None, None) => {
                self.report(account_span.clone(), k("credentials_file"), "grant = \"jwt_bearer\" needs credentials_file (a Google service-account key) or private_key with assertion_issuer and assertion_subject");
                None
            }
        }
    }

    /// The keys only the `jwt_bearer` grant reads, refused on any other grant where they
    /// are written (they would be silently ignored, and a `credentials_file` would stand
    /// in for the `token_url` such an account needs).
    pub(super) fn refuse_bearer_keys(&mut self, raw: &RawAccount, k: &dyn Fn(&str) -> String) {
        for (key, value) in [
            ("credentials_file", &raw.credentials_file),
            ("assertion_issuer", &raw.assertion_issuer),
            ("assertion_subject", &raw.assertion_subject),
        ] {
            if let Some(v) = value {
                self.report(v.span(), k(key), "is for grant = \"jwt_bearer\" only");
            }
        }
    }

    /// `signing_alg` for a private key (not HS256); `None` when unset or reported.
    pub(super) fn signing_alg(
        &mut self,
        raw: &RawAccount,
        k: &dyn Fn(&str) -> String,
    ) -> Option<SigningAlg> {
        let a = raw.signing_alg.as_ref()?;
        match SigningAlg::parse(a.get_ref()) {
            Some(SigningAlg::Hs256) | None => {
                self.report(
                    a.span(),
                    k("signing_alg"),
                    "a private key signs with RS256, PS256 or ES256",
                );
                None
            }
            alg => alg,
        }
    }

    /// Reads and checks a Google service-account key file: a secret file (it holds the
    /// private key), so its mode is checked and its text never quoted.
    fn service_account(
        &mut self,
        raw: &Spanned<String>,
        alg: Option<SigningAlg>,
        key: &str,
    ) -> Option<(BearerAssertion, Option<Url>)> {
        let path = self.secret_path(raw.get_ref().as_ref());
        let mut text = match self.env.read_file(&path) {
            Ok(text) => text,
            Err(e) => {
                self.report(
                    raw.span(),
                    key,
                    format!("cannot read {}: {e}", path.display()),
                );
                return None;
            }
        };
        self.check_secret_file(raw.span(), key, &path);
        self.secret_sources
            .insert(key.to_string(), SecretSource::File(path.clone()));
        let parsed = serde_json::from_str::<ServiceAccountKey>(&text);
        text.zeroize();
        let mut sa = match parsed {
            Ok(sa) if sa.kind.as_deref().is_none_or(|t| t == "service_account") => sa,
            Ok(_) => {
                self.report(
                    raw.span(),
                    key,
                    format!(
                        "{} is not a service-account key (its type is not \"service_account\")",
                        path.display()
                    ),
                );
                return None;
            }
            // serde's message names the field, never a value of this file.
            Err(e) => {
                let what = e.to_string();
                let what = what.split(" at line").next().unwrap_or_default();
                self.report(
                    raw.span(),
                    key,
                    format!(
                        "{} is not a service-account key file: {what}",
                        path.display()
                    ),
                );
                return None;
            }
        };
        let pem = Secret::new(std::mem::take(&mut sa.private_key));
        let signing = self.signing_key(&pem, alg, raw.span(), key)?;
        let token_uri = match sa
            .token_uri
            .as_deref()
            .map(|u| crate::config::check_endpoint_url(u, false))
        {
            None => None,
            Some(Ok(url)) => Some(url),
            Some(Err(msg)) => {
                self.report(raw.span(), key, format!("its token_uri: {msg}"));
                return None;
            }
        };
        let assertion = BearerAssertion {
            key: signing,
            key_id: sa.private_key_id,
            issuer: sa.client_email,
            subject: None,
            audience: None,
            scope_in_claim: true,
        };
        Some((assertion, token_uri))
    }

    pub(super) fn signing_key(
        &mut self,
        pem: &Secret,
        alg: Option<SigningAlg>,
        span: Range<usize>,
        key: &str,
    ) -> Option<SigningKey> {
        SigningKey::from_pem(pem, alg)
            .map_err(|msg| self.report(span, key, msg))
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use proptest::prelude::*;

    use crate::config::test_env::{ec_key_pem, env};
    use crate::config::{Config, ConfigError, Grant};

    /// A jwt_bearer account with `rest`, its key file at /etc/tokend/sa.json holding `sa`.
    fn load(sa: &str, rest: &str) -> Result<Config, ConfigError> {
        let mut e = env();
        e.files
            .insert(PathBuf::from("/etc/tokend/sa.json"), sa.into());
        e.files
            .insert(PathBuf::from("/etc/tokend/k.pem"), ec_key_pem());
        let text = format!("[accounts.g]\ngrant = \"jwt_bearer\"\n{rest}");
        Config::from_str_at(&text, Path::new("/etc/tokend/tokend.toml"), &e)
    }

    #[test]
    fn a_google_key_file_gives_issuer_key_id_and_token_endpoint() {
        let sa = serde_json::json!({
            "type": "service_account", "client_email": "sa@p.iam.gserviceaccount.com",
            "private_key": ec_key_pem(), "private_key_id": "kid1",
            "token_uri": "https://oauth2.googleapis.com/token",
        });
        let c = load(
            &sa.to_string(),
            "credentials_file = \"sa.json\"\nscope = \"s\"\n",
        )
        .unwrap();
        let a = c.accounts.values().next().unwrap();
        assert_eq!(
            a.token_url.as_ref().unwrap().as_str(),
            "https://oauth2.googleapis.com/token"
        );
        assert_eq!(a.client_id, "", "no client needed");
        let Grant::JwtBearer(b) = &a.grant else {
            panic!("jwt_bearer expected")
        };
        assert_eq!(b.issuer, "sa@p.iam.gserviceaccount.com");
        assert_eq!(b.key_id.as_deref(), Some("kid1"));
        assert!(b.scope_in_claim && b.subject.is_none());
        assert!(
            !format!("{c:?}").contains("BEGIN"),
            "Debug never shows the key"
        );
    }

    #[test]
    fn a_broken_key_file_or_missing_claims_are_named_without_quoting_the_file() {
        let secret_looking = r#"{"client_email": "x", "private_key": "-----BEGIN PRIVATE KEY-----\nTOPSECRET\n-----END PRIVATE KEY-----\n"}"#;
        let err = load(secret_looking, "credentials_file = \"sa.json\"\n").unwrap_err();
        assert_eq!(err.problems[0].key, "accounts.g.credentials_file", "{err}");
        assert!(!err.to_string().contains("TOPSECRET"), "{err}");
        let err = load(
            "{\"private_key\": \"TOPSECRET\"",
            "credentials_file = \"sa.json\"\n",
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("not a service-account key file"),
            "{err}"
        );
        assert!(!err.to_string().contains("TOPSECRET"), "{err}");
        let err = load("", "token_url = \"https://x/t\"\nprivate_key = { file = \"k.pem\" }\nassertion_issuer = \"i\"\n").unwrap_err();
        assert!(err.to_string().contains("assertion_subject"), "{err}");
        let err = load("", "token_url = \"https://x/t\"\n").unwrap_err();
        assert_eq!(err.problems[0].key, "accounts.g.credentials_file", "{err}");
    }

    #[test]
    fn bearer_keys_on_another_grant_are_refused_not_ignored() {
        let text = "[accounts.a]\ngrant = \"client_credentials\"\nclient_id = \"c\"\nclient_secret = \"s\"\ncredentials_file = \"sa.json\"\nassertion_issuer = \"i\"\nassertion_subject = \"s\"\n";
        let err =
            Config::from_str_at(text, Path::new("/etc/tokend/tokend.toml"), &env()).unwrap_err();
        let keys: Vec<_> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "accounts.a.token_url",
                "accounts.a.credentials_file",
                "accounts.a.assertion_issuer",
                "accounts.a.assertion_subject"
            ],
            "{err}"
        );
        let err = load("", "token_url = \"https://x/t\"\nprivate_key = { file = \"k.pem\" }\nassertion_issuer = \"i\"\nassertion_subject = \"s\"\nclient_assertion = { file = \"k.pem\" }\n").unwrap_err();
        assert_eq!(err.problems[0].key, "accounts.g.client_assertion", "{err}");
    }

    #[test]
    fn the_shipped_google_example_is_valid() {
        let sa = serde_json::json!({
            "type": "service_account", "client_email": "sa@p.iam.gserviceaccount.com",
            "private_key": ec_key_pem(), "private_key_id": "kid1",
            "token_uri": "https://oauth2.googleapis.com/token",
        });
        let mut e = env();
        e.files
            .insert(PathBuf::from("/etc/tokend/sa.json"), sa.to_string());
        let text = include_str!("../../../config/google-service-account.toml");
        let c = Config::from_str_at(text, Path::new("google.toml"), &e).unwrap();
        assert_eq!(
            c.accounts.values().next().unwrap().grant.as_str(),
            "jwt_bearer"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn key_file_parsing_never_panics(
            text in r#"\{("(type|client_email|private_key|private_key_id|token_uri)": ("[a-z:/.@ -]{0,20}"|[0-9]{1,3}|null), ?){0,5}\}?"#
        ) {
            let _ = load(&text, "credentials_file = \"sa.json\"\n");
        }
    }
}
