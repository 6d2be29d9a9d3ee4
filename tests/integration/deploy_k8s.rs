//! The Kubernetes examples in deploy/kubernetes/ hold what they promise: every document
//! parses; the embedded tokend config is valid for tokend itself, given the environment
//! its pod provides from the example Secret; the probes reach `/readyz` and `/healthz` on
//! the port that config listens on; the store URL and every other secret come from the
//! Secret, never a literal; the container runs as deploy/Dockerfile's image does.

use std::collections::HashMap;
use std::path::Path;

use tokend::config::{Config, Environment, ListenAddr, StateBackend};
use yaml_rust2::{Yaml, YamlLoader};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes");
const DOCKERFILE: &str = include_str!("../../deploy/Dockerfile");

/// Every document of `file` in deploy/kubernetes/.
fn documents(file: &str) -> Vec<Yaml> {
    let path = Path::new(DIR).join(file);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let docs = YamlLoader::load_from_str(&text)
        .unwrap_or_else(|e| panic!("{file} is not valid YAML: {e}"));
    for doc in &docs {
        for key in ["apiVersion", "kind"] {
            assert!(
                doc[key].as_str().is_some(),
                "{file}: a document without {key}"
            );
        }
        assert!(
            doc["metadata"]["name"].as_str().is_some(),
            "{file}: a {} without a name",
            kind(doc)
        );
    }
    docs
}

fn kind(doc: &Yaml) -> &str {
    doc["kind"].as_str().unwrap_or("?")
}

fn one<'a>(docs: &'a [Yaml], wanted: &str, file: &str) -> &'a Yaml {
    let found: Vec<_> = docs.iter().filter(|d| kind(d) == wanted).collect();
    assert_eq!(found.len(), 1, "{file}: one {wanted}");
    found[0]
}

fn list(y: &Yaml) -> &[Yaml] {
    y.as_vec().map_or(&[], Vec::as_slice)
}

fn strings(y: &Yaml) -> Vec<&str> {
    list(y).iter().filter_map(Yaml::as_str).collect()
}

/// The example Secret's keys and values.
fn example_secret() -> (String, HashMap<String, String>) {
    let docs = documents("secret.example.yaml");
    let secret = one(&docs, "Secret", "secret.example.yaml");
    let data = secret["stringData"]
        .as_hash()
        .expect("the example Secret has stringData");
    let values = data
        .iter()
        .map(|(k, v)| {
            let (k, v) = (k.as_str().unwrap(), v.as_str().unwrap());
            (k.to_string(), v.to_string())
        })
        .collect();
    (secret["metadata"]["name"].as_str().unwrap().into(), values)
}

/// The environment a container gets: what `container_env` found.
struct PodEnv(HashMap<String, String>);

impl Environment for PodEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }

    fn read_file(&self, path: &Path) -> std::io::Result<String> {
        Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "{}: the examples take every secret from the environment",
                path.display()
            ),
        ))
    }
}

/// The container's variables, each secret one from the example Secret (its value there):
/// a literal is allowed only for the app's `TOKEND_URL`, which is no secret.
fn container_env(container: &Yaml, file: &str) -> PodEnv {
    let (secret_name, values) = example_secret();
    let mut env = HashMap::new();
    for var in list(&container["env"]) {
        let name = var["name"].as_str().expect("an env entry has a name");
        if let Some(literal) = var["value"].as_str() {
            assert!(
                !name.starts_with("TOKEND_") || name == "TOKEND_URL",
                "{file}: {name} is a literal"
            );
            env.insert(name.to_string(), literal.to_string());
            continue;
        }
        let from = &var["valueFrom"]["secretKeyRef"];
        assert_eq!(
            from["name"].as_str(),
            Some(secret_name.as_str()),
            "{file}: {name} comes from the example Secret"
        );
        let key = from["key"].as_str().unwrap();
        let value = values
            .get(key)
            .unwrap_or_else(|| panic!("{file}: {name} names key {key}, not in the Secret"));
        env.insert(name.to_string(), value.clone());
    }
    PodEnv(env)
}

/// Where the image reads its config: the Dockerfile's `TOKEND_CONFIG`.
fn dockerfile_config_path() -> String {
    let at = DOCKERFILE
        .find("TOKEND_CONFIG=")
        .expect("the Dockerfile sets TOKEND_CONFIG");
    let rest = &DOCKERFILE[at + "TOKEND_CONFIG=".len()..];
    rest.split_whitespace().next().unwrap().to_string()
}

/// The image's `USER uid:gid`.
fn dockerfile_user() -> (i64, i64) {
    let line = DOCKERFILE
        .lines()
        .find(|l| l.starts_with("USER "))
        .expect("the Dockerfile names its USER");
    let (uid, gid) = line["USER ".len()..].trim().split_once(':').unwrap();
    (uid.parse().unwrap(), gid.parse().unwrap())
}

/// The tokend container of `deployment`, its config (the ConfigMap mounted where the image
/// reads it, parsed by tokend with the container's environment), and its pod spec.
fn tokend_of<'a>(docs: &'a [Yaml], file: &str) -> (&'a Yaml, &'a Yaml, Config) {
    let deployment = one(docs, "Deployment", file);
    let pod = &deployment["spec"]["template"]["spec"];
    let container = list(&pod["containers"])
        .iter()
        .find(|c| c["name"].as_str() == Some("tokend"))
        .unwrap_or_else(|| panic!("{file}: a container named tokend"));

    let config_path = dockerfile_config_path();
    let (dir, file_name) = config_path.rsplit_once('/').unwrap();
    let mount = list(&container["volumeMounts"])
        .iter()
        .find(|m| m["mountPath"].as_str() == Some(dir))
        .unwrap_or_else(|| panic!("{file}: the config is mounted on {dir}"));
    assert_eq!(mount["readOnly"].as_bool(), Some(true), "{file}");
    let volume = list(&pod["volumes"])
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    let map_name = volume["configMap"]["name"]
        .as_str()
        .expect("a ConfigMap volume");
    let map = docs
        .iter()
        .find(|d| kind(d) == "ConfigMap" && d["metadata"]["name"].as_str() == Some(map_name))
        .unwrap_or_else(|| panic!("{file}: ConfigMap {map_name}"));
    let text = map["data"][file_name]
        .as_str()
        .unwrap_or_else(|| panic!("{file}: ConfigMap {map_name} has {file_name}"));
    let env = container_env(container, file);
    let config = Config::from_str_at(text, Path::new(&config_path), &env)
        .unwrap_or_else(|e| panic!("{file}: tokend refuses the embedded config:\n{e}"));
    (pod, container, config)
}

fn listen_port(config: &Config, file: &str) -> (std::net::SocketAddr, u16) {
    match config.server.listen.first() {
        Some(ListenAddr::Tcp(addr)) => (*addr, addr.port()),
        other => panic!("{file}: tokend listens on TCP first, not {other:?}"),
    }
}

/// The store URL is the Secret's: the config names an environment variable, never a
/// literal, and the container takes that variable from a secretKeyRef.
fn assert_store_url_from_secret(
    text_of_config: &str,
    container: &Yaml,
    config: &Config,
    file: &str,
) {
    let raw: toml::Table = toml::from_str(text_of_config).unwrap();
    let url = &raw["state"]["url"];
    let var = url
        .get("env")
        .and_then(toml::Value::as_str)
        .unwrap_or_else(|| panic!("{file}: state.url is {{ env = ... }}, not {url}"));
    let entry = list(&container["env"])
        .iter()
        .find(|e| e["name"].as_str() == Some(var))
        .unwrap_or_else(|| panic!("{file}: the container sets {var}"));
    assert!(entry["value"].is_badvalue(), "{file}: {var} is a literal");
    assert!(!entry["valueFrom"]["secretKeyRef"].is_badvalue(), "{file}");
    assert!(
        matches!(config.state.backend, StateBackend::Postgres { .. }),
        "{file}: the replicas share PostgreSQL"
    );
    assert!(
        raw["state"].get("node_id").is_none(),
        "{file}: node_id stays unset: each pod's hostname names it"
    );
}

/// The hardening of deploy/Dockerfile's image, held by the container (seccomp may be
/// set for the whole pod).
fn assert_hardened(pod: &Yaml, container: &Yaml, file: &str) {
    let sc = &container["securityContext"];
    let (uid, gid) = dockerfile_user();
    assert_eq!(sc["runAsUser"].as_i64(), Some(uid), "{file}");
    assert_eq!(sc["runAsGroup"].as_i64(), Some(gid), "{file}");
    assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true), "{file}");
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true), "{file}");
    assert_eq!(
        sc["allowPrivilegeEscalation"].as_bool(),
        Some(false),
        "{file}"
    );
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"], "{file}");
    assert!(sc["privileged"].as_bool() != Some(true), "{file}");
    let seccomp = [
        &sc["seccompProfile"],
        &pod["securityContext"]["seccompProfile"],
    ];
    assert!(
        seccomp
            .iter()
            .any(|s| s["type"].as_str() == Some("RuntimeDefault")),
        "{file}: seccomp RuntimeDefault"
    );
}

/// A probe asks `path` on the port tokend listens on: by httpGet (the port by number or
/// by the name of a containerPort), or, for a loopback listener the kubelet cannot
/// reach, by running the binary's own check, which asks the config's listen address.
fn assert_probe(
    container: &Yaml,
    probe: &str,
    path: &str,
    listen: (std::net::SocketAddr, u16),
    file: &str,
) {
    let p = &container[probe];
    assert!(!p.is_badvalue(), "{file}: tokend has a {probe}");
    let get = &p["httpGet"];
    if !get.is_badvalue() {
        assert_eq!(get["path"].as_str(), Some(path), "{file}: {probe}");
        let port = match &get["port"] {
            Yaml::Integer(n) => *n,
            Yaml::String(name) => list(&container["ports"])
                .iter()
                .find(|p| p["name"].as_str() == Some(name))
                .and_then(|p| p["containerPort"].as_i64())
                .unwrap_or_else(|| panic!("{file}: {probe} names port {name}, not declared")),
            other => panic!("{file}: {probe} port {other:?}"),
        };
        assert_eq!(
            port,
            i64::from(listen.1),
            "{file}: {probe} on the listen port"
        );
        assert!(
            !listen.0.ip().is_loopback(),
            "{file}: the kubelet cannot reach a loopback listener"
        );
        return;
    }
    // `tokend health` asks /readyz; `tokend health --live` asks /healthz.
    let command = strings(&p["exec"]["command"]);
    let expected: &[&str] = match path {
        "/readyz" => &["/tokend", "health"],
        "/healthz" => &["/tokend", "health", "--live"],
        other => panic!("no tokend command asks {other}"),
    };
    assert_eq!(command, expected, "{file}: {probe}");
}

fn config_text<'a>(docs: &'a [Yaml], file: &str) -> &'a str {
    let name = dockerfile_config_path();
    let file_name = name.rsplit('/').next().unwrap();
    one(docs, "ConfigMap", file)["data"][file_name]
        .as_str()
        .unwrap()
}

#[test]
fn the_sidecar_serves_its_pod_only_and_is_probed_through_the_binary() {
    let file = "sidecar.yaml";
    let docs = documents(file);
    let (pod, container, config) = tokend_of(&docs, file);
    let listen = listen_port(&config, file);
    assert!(
        listen.0.ip().is_loopback(),
        "{file}: a sidecar listens on loopback"
    );
    assert!(!config.server.allow_remote, "{file}");
    assert_probe(container, "readinessProbe", "/readyz", listen, file);
    assert_probe(container, "livenessProbe", "/healthz", listen, file);
    assert_store_url_from_secret(config_text(&docs, file), container, &config, file);
    assert_hardened(pod, container, file);
    assert!(
        list(&pod["containers"]).len() >= 2,
        "{file}: beside the app"
    );
}

#[test]
fn the_deployment_runs_three_replicas_behind_a_service_with_keys_for_every_reader() {
    let file = "deployment.yaml";
    let docs = documents(file);
    let (pod, container, config) = tokend_of(&docs, file);
    let deployment = one(&docs, "Deployment", file);
    assert_eq!(deployment["spec"]["replicas"].as_i64(), Some(3), "{file}");
    let listen = listen_port(&config, file);
    assert!(config.server.allow_remote, "{file}: serves other pods");
    assert!(
        !config.consumers.is_empty() && config.consumers.iter().all(|c| c.key_sha256.is_some()),
        "{file}: every reader over the network has a key"
    );
    assert_probe(container, "readinessProbe", "/readyz", listen, file);
    assert_probe(container, "livenessProbe", "/healthz", listen, file);
    assert_store_url_from_secret(config_text(&docs, file), container, &config, file);
    assert_hardened(pod, container, file);

    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let selects_pods = |selector: &Yaml| {
        let wanted = selector.as_hash().expect("a selector");
        !wanted.is_empty()
            && wanted
                .iter()
                .all(|(k, v)| &labels[k.as_str().unwrap()] == v)
    };
    let service = one(&docs, "Service", file);
    assert!(
        selects_pods(&service["spec"]["selector"]),
        "{file}: Service"
    );
    let port = &list(&service["spec"]["ports"])[0]["targetPort"];
    assert!(
        port.as_i64() == Some(i64::from(listen.1)) || port.as_str() == Some("http"),
        "{file}: the Service targets the listen port"
    );
    let pdb = one(&docs, "PodDisruptionBudget", file);
    assert!(
        selects_pods(&pdb["spec"]["selector"]["matchLabels"]),
        "{file}: PodDisruptionBudget"
    );
    assert_eq!(pdb["spec"]["maxUnavailable"].as_i64(), Some(1), "{file}");
}
