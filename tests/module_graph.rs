//! The library's module graph has no cycles: data flows one way (parse → map → base spectrum →
//! update → verdict → clamp → metrics), and a module never reaches back into one that uses it.
//! Read from the sources' `crate::` and `super::` paths, at two levels: top-level modules
//! (`crate::policy`) and files (`crate::spectrum::krylov`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path of every file under `src/`, and its source with comments removed.
fn modules(src: &Path) -> BTreeMap<Vec<String>, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
                parts.pop();
            }
            let code: String = std::fs::read_to_string(&path)
                .unwrap()
                .lines()
                .map(|l| l.split("//").next().unwrap_or(""))
                .collect::<Vec<_>>()
                .join("\n");
            out.insert(parts, code);
        }
    }
    out
}

/// Every path the code names after `crate::` or `super::`, resolved to absolute module paths;
/// grouped imports (`crate::{a, b::c}`) are expanded one level.
fn references(module: &[String], code: &str) -> Vec<Vec<String>> {
    let mut refs = Vec::new();
    for (prefix, base) in [("crate::", Vec::new()), ("super::", parent(module))] {
        let mut rest = code;
        while let Some(i) = rest.find(prefix) {
            let before = rest[..i].chars().last();
            rest = &rest[i + prefix.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                for item in group[..end].split(',') {
                    refs.push(join(&base, &path_of(item.trim())));
                }
            } else {
                refs.push(join(&base, &path_of(rest)));
            }
        }
    }
    refs
}

/// What `super` names in `module` (in `a/mod.rs` as in `a.rs`: the module above `a`).
fn parent(module: &[String]) -> Vec<String> {
    module[..module.len().saturating_sub(1)].to_vec()
}

fn path_of(s: &str) -> Vec<String> {
    let end = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(s.len());
    s[..end]
        .split("::")
        .filter(|p| !p.is_empty())
        .map(String::from)
        .collect()
}

fn join(base: &[String], rest: &[String]) -> Vec<String> {
    base.iter().chain(rest).cloned().collect()
}

/// The longest known module that `path` starts with.
fn owner(path: &[String], known: &BTreeSet<Vec<String>>) -> Vec<String> {
    (0..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|p| known.contains(p))
        .unwrap_or_default()
}

/// A cycle in the graph, if any, as the list of its nodes.
fn find_cycle(edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Option<Vec<Vec<String>>> {
    fn visit(
        n: &Vec<String>,
        edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        state: &mut BTreeMap<Vec<String>, u8>,
        stack: &mut Vec<Vec<String>>,
    ) -> Option<Vec<Vec<String>>> {
        state.insert(n.clone(), 1);
        stack.push(n.clone());
        for m in edges.get(n).into_iter().flatten() {
            match state.get(m).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|x| x == m).unwrap();
                    return Some(stack[at..].iter().chain([m]).cloned().collect());
                }
                0 => {
                    if let Some(c) = visit(m, edges, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.clone(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in edges.keys() {
        if state.get(n).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, edges, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

fn graph(
    level: impl Fn(Vec<String>) -> Vec<String>,
) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mods = modules(&src);
    let known: BTreeSet<Vec<String>> = mods.keys().cloned().collect();
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (m, code) in &mods {
        let from = level(m.clone());
        for r in references(m, code) {
            let to = level(owner(&r, &known));
            // A module may use its own descendants and the crate root's re-exports.
            if to.is_empty() || to == from || to.starts_with(&from) || from.starts_with(&to) {
                continue;
            }
            edges.entry(from.clone()).or_default().insert(to);
        }
    }
    edges
}

fn show(cycle: &[Vec<String>]) -> String {
    cycle
        .iter()
        .map(|m| format!("crate::{}", m.join("::")))
        .collect::<Vec<_>>()
        .join(" → ")
}

#[test]
fn no_cycle_between_top_level_modules() {
    let edges = graph(|m| m.into_iter().take(1).collect());
    assert!(
        edges.len() > 5,
        "the graph should see the library's modules"
    );
    if let Some(c) = find_cycle(&edges) {
        panic!("module cycle: {}", show(&c));
    }
}

#[test]
fn no_cycle_between_files() {
    if let Some(c) = find_cycle(&graph(|m| m)) {
        panic!("module cycle: {}", show(&c));
    }
}

#[test]
fn the_checker_sees_a_planted_cycle() {
    let mut edges = graph(|m| m.into_iter().take(1).collect());
    let (a, b) = (vec!["policy".to_string()], vec!["report".to_string()]);
    assert!(edges[&b].contains(&a), "report uses policy");
    edges.entry(a).or_default().insert(b);
    assert!(find_cycle(&edges).is_some());
}
