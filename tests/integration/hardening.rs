//! Parser hardening: property tests feed arbitrary and mutated input to the token
//! response parser, the JWT reader and the config loader. None may panic; each must
//! answer with a value or a typed error. Case counts are bounded so CI time is too.

use std::path::Path;

use http::{HeaderMap, HeaderValue, StatusCode};
use proptest::prelude::*;
use tokend::config::{Config, SystemEnvironment};
use tokend::provider::{jwt_exp, parse_response};
use tokend::secret::Secret;

const VALID_CONFIG: &str = r#"
[server]
listen = ["127.0.0.1:8731"]
[state]
dir = "/var/lib/tokend"
[refresh]
margin = "2m"
[accounts.zywave]
grant = "refresh_token"
token_url = "https://auth.zywave.com/connect/token"
client_id = "my-client"
client_secret = "s"
scope = "offline_access accounts:read"
refresh_token = "rt"
headers = { Profile = "B 1234" }
[consumers.app]
key_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
accounts = ["zywave"]
"#;

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
            .map_or(serde_json::Value::Null, serde_json::Value::Number)),
        ".{0,40}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("access_token".to_string()),
                    Just("expires_in".to_string()),
                    Just("token_type".to_string()),
                    Just("refresh_token".to_string()),
                    Just("scope".to_string()),
                    Just("error".to_string()),
                    Just("error_description".to_string()),
                    Just("refresh_expires_in".to_string()),
                    "[a-z_]{1,12}",
                ],
                inner,
                0..8
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    #[test]
    fn token_responses_never_panic(status in 100u16..600, body in prop::collection::vec(any::<u8>(), 0..512), retry_after in ".{0,30}") {
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&retry_after) {
            headers.insert(http::header::RETRY_AFTER, v);
        }
        let secret = Secret::new("s3cret-value");
        let _ = parse_response(StatusCode::from_u16(status).unwrap(), &headers, &body, &[&secret]);
    }

    #[test]
    fn structured_token_responses_parse_or_fail_cleanly(status in prop_oneof![Just(200u16), Just(400), Just(401), Just(503)], value in json_value()) {
        let body = serde_json::to_vec(&value).unwrap();
        match parse_response(StatusCode::from_u16(status).unwrap(), &HeaderMap::new(), &body, &[]) {
            Ok(t) => {
                prop_assert!(!t.access_token.expose().is_empty());
                prop_assert!(!t.token_type.is_empty());
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn jwt_exp_never_panics(token in ".{0,200}") {
        let _ = jwt_exp(&token);
    }

    #[test]
    fn arbitrary_config_text_never_panics(text in ".{0,400}") {
        let _ = Config::from_str_at(&text, Path::new("fuzz.toml"), &SystemEnvironment);
    }

    #[test]
    fn mutated_configs_fail_with_located_errors(pos in 0usize..VALID_CONFIG.len(), cut in 0usize..40, insert in "[\\[\\]=\"{},a-z0-9 \n.]{0,12}") {
        let mut text = VALID_CONFIG.to_string();
        let start = (0..=pos).rev().find(|i| text.is_char_boundary(*i)).unwrap();
        let end = (start + cut).min(text.len());
        let end = (end..=text.len()).find(|i| text.is_char_boundary(*i)).unwrap();
        text.replace_range(start..end, &insert);
        if let Err(e) = Config::from_str_at(&text, Path::new("fuzz.toml"), &SystemEnvironment) {
            for p in &e.problems {
                prop_assert_eq!(&p.file, "fuzz.toml");
                let lines = text.lines().count().max(1);
                prop_assert!(p.line <= lines + 1, "line {} of {}", p.line, lines);
                prop_assert!(!p.message.is_empty());
            }
            prop_assert!(!e.to_string().contains("rt\""), "no secret value echoed: {}", e);
        }
    }
}

#[test]
fn the_unmutated_config_is_valid() {
    Config::from_str_at(VALID_CONFIG, Path::new("fuzz.toml"), &SystemEnvironment).unwrap();
}
