//! The source tree keeps the shape docs/ARCHITECTURE.md describes: the top-level rooms
//! of `src/` import each other without cycles (dependencies point down the data flow),
//! and no source file grows past the size a reader can hold.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Non-test lines a source file may have before it should become a folder.
const MAX_CODE_LINES: usize = 900;

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The file's text up to its unit-test module: what ships.
fn code_of(text: &str) -> &str {
    text.find("\n#[cfg(test)]\nmod tests")
        .or_else(|| text.find("\n#[cfg(all(test"))
        .map_or(text, |i| &text[..i])
}

/// `src/config/validate/mod.rs` → `config`; `src/http.rs` → `http`.
fn room_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src");
    let first = rel.components().next().expect("a component");
    first
        .as_os_str()
        .to_string_lossy()
        .trim_end_matches(".rs")
        .to_string()
}

fn leading_ident(text: &str) -> String {
    text.trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// The first names of a `{a::X, b::{Y, Z}}` group: `a`, `b`.
fn group_heads(group: &str) -> Vec<String> {
    let mut heads = vec![leading_ident(group)];
    let mut depth = 0;
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => heads.push(leading_ident(&group[i + 1..])),
            _ => {}
        }
    }
    heads
}

/// The rooms a file names as `crate::room` or `crate::{room::…, …}`, in code or docs
/// (a doc link up the flow is a dependency of the reader's mind all the same).
fn imports(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        let names = match rest.strip_prefix('{') {
            Some(group) => group_heads(group),
            None => vec![leading_ident(rest)],
        };
        found.extend(names.into_iter().filter(|n| !n.is_empty()));
    }
    found
}

#[test]
fn grouped_imports_count_each_room() {
    let found = imports("use crate::{config::{A, B}, store::State};\nuse crate::clock::Clock;");
    assert_eq!(
        found,
        BTreeSet::from(["clock".into(), "config".into(), "store".into()])
    );
}

fn room_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let rooms: BTreeSet<String> = files.iter().map(|f| room_of(&src, f)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let room = room_of(&src, file);
        if room == "lib" || room == "main" {
            continue;
        }
        let text = std::fs::read_to_string(file).expect("read source");
        let edges = graph.entry(room.clone()).or_default();
        for target in imports(code_of(&text)) {
            if target != room && rooms.contains(&target) {
                edges.insert(target);
            }
        }
    }
    graph
}

/// A cycle through `start`, if there is one, as the rooms along it.
fn cycle_from(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    fn walk(
        graph: &BTreeMap<String, BTreeSet<String>>,
        start: &str,
        at: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in graph.get(at).into_iter().flatten() {
            if next == start {
                path.push(next.clone());
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(graph, start, next, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_string()];
    let mut seen = BTreeSet::new();
    walk(graph, start, start, &mut path, &mut seen).then_some(path)
}

#[test]
fn the_rooms_of_src_import_each_other_without_cycles() {
    let graph = room_graph();
    assert!(graph.len() > 10, "found the rooms: {graph:?}");
    let cycles: Vec<String> = graph
        .keys()
        .filter_map(|room| cycle_from(&graph, room))
        .map(|c| c.join(" → "))
        .collect();
    assert!(cycles.is_empty(), "import cycles: {cycles:#?}");
}

#[test]
fn the_cycle_finder_finds_a_planted_cycle() {
    let mut graph = BTreeMap::new();
    graph.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    graph.insert("b".to_string(), BTreeSet::from(["c".to_string()]));
    graph.insert("c".to_string(), BTreeSet::from(["a".to_string()]));
    assert_eq!(
        cycle_from(&graph, "a").map(|c| c.join(" → ")),
        Some("a → b → c → a".to_string())
    );
    graph.insert("c".to_string(), BTreeSet::new());
    assert_eq!(cycle_from(&graph, "a"), None);
}

#[test]
fn no_source_file_outgrows_a_reader() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let too_long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let text = std::fs::read_to_string(f).expect("read source");
            let lines = code_of(&text).lines().count();
            (lines > MAX_CODE_LINES).then(|| {
                format!(
                    "{}: {lines} lines",
                    f.strip_prefix(&src).unwrap_or(f).display()
                )
            })
        })
        .collect();
    assert!(
        too_long.is_empty(),
        "over {MAX_CODE_LINES} lines of non-test code: {too_long:?}"
    );
}
