//! The map matches the territory: no two source files import each other (directly or round a
//! longer circle), and every import between top-level modules is one that docs/ARCHITECTURE.md's
//! table ("What each module may import") allows. Reads the sources as text; builds nothing.
//!
//! An import is a `use crate::…` / `use super::…` statement or a `crate::…` / `super::…` path in
//! code, resolved to the file that defines the module it names. Re-exports (`pub use`) and
//! `mod` declarations are not imports; test modules (`#[cfg(test)]` to the end of a file) are
//! left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `src/`, by its path relative to `src/`.
fn sources() -> BTreeMap<String, String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, root, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let rel = p
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                out.insert(rel, std::fs::read_to_string(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    let root = src_dir();
    walk(&root, &root, &mut out);
    out
}

/// `config/hf.rs` -> [config, hf]; `config/mod.rs` -> [config]; `lib.rs` -> [].
fn module_path(rel: &str) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .trim_end_matches(".rs")
        .split('/')
        .map(String::from)
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// The code a file runs: comments and test modules removed.
fn code_of(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or("");
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `a::{b, c::{d, e}}` -> [a::b, a::c::d, a::c::e].
fn expand(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        let path = tree.split(" as ").next().unwrap_or("").trim();
        return vec![path.to_string()];
    };
    let prefix = tree[..open].trim_end_matches("::").trim();
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let mut items = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, ch) in inner.char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&inner[start..]);
    items
        .into_iter()
        .filter(|x| !x.trim().is_empty())
        .flat_map(expand)
        .map(|rest| {
            if rest == "self" {
                prefix.to_string()
            } else if prefix.is_empty() {
                rest
            } else {
                format!("{prefix}::{rest}")
            }
        })
        .collect()
}

/// Module paths a file imports, relative to the crate root.
fn imports(rel: &str, code: &str) -> Vec<Vec<String>> {
    let me = module_path(rel);
    let absolute = |path: &str| -> Option<Vec<String>> {
        let mut segs = path.split("::").map(str::trim).filter(|s| !s.is_empty());
        let mut base = match segs.next()? {
            "crate" => Vec::new(),
            "super" => me[..me.len().saturating_sub(1)].to_vec(),
            "self" => me.clone(),
            _ => return None,
        };
        for s in segs {
            if s == "super" {
                base.pop();
            } else {
                base.push(s.to_string());
            }
        }
        Some(base)
    };
    let mut out = Vec::new();
    let mut rest = code.to_string();
    // `use` statements (re-exports skipped), then removed so that the path scan below does not
    // see them twice.
    let mut scanned = String::new();
    while let Some(i) = rest.find("use ") {
        let before = &rest[..i];
        let line_start = before.rfind('\n').map_or(0, |n| n + 1);
        let lead = rest[line_start..i].trim();
        let is_stmt = lead.is_empty() || lead.starts_with("pub");
        let end = rest[i..].find(';').map_or(rest.len(), |e| i + e);
        if is_stmt && !lead.starts_with("pub") {
            out.extend(expand(&rest[i + 4..end]).iter().filter_map(|p| absolute(p)));
        }
        if is_stmt {
            scanned.push_str(&rest[..line_start]);
            rest = rest[(end + 1).min(rest.len())..].to_string();
        } else {
            scanned.push_str(&rest[..i + 4]);
            rest = rest[i + 4..].to_string();
        }
    }
    scanned.push_str(&rest);
    // Paths in code: `crate::a::b` and `super::a::b`.
    for root in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(i) = scanned[from..].find(root) {
            let at = from + i;
            let prev = scanned[..at].chars().last();
            from = at + root.len();
            if prev.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let len = scanned[at..]
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(scanned.len() - at);
            if let Some(p) = absolute(scanned[at..at + len].trim_end_matches(':')) {
                out.push(p);
            }
        }
    }
    out
}

/// File -> files it imports.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let files = sources();
    let by_module: BTreeMap<Vec<String>, String> =
        files.keys().map(|f| (module_path(f), f.clone())).collect();
    let resolve = |path: &[String]| -> Option<String> {
        (1..=path.len())
            .rev()
            .find_map(|k| by_module.get(&path[..k]).cloned())
    };
    files
        .iter()
        .map(|(rel, text)| {
            let deps = imports(rel, &code_of(text))
                .iter()
                .filter_map(|p| resolve(p))
                .filter(|f| f != rel)
                .collect();
            (rel.clone(), deps)
        })
        .collect()
}

/// A circle of files, if any.
fn find_cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            match state.get(m.as_str()).copied().unwrap_or(0) {
                0 => {
                    if let Some(c) = visit(m, g, state, stack) {
                        return Some(c);
                    }
                }
                1 => {
                    let start = stack.iter().position(|x| x == m).unwrap_or(0);
                    let mut c = stack[start..].to_vec();
                    c.push(m.clone());
                    return Some(c);
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in g.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, g, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

/// docs/ARCHITECTURE.md's table: module -> the modules it may import (`None`: every module).
fn allowed() -> BTreeMap<String, Option<BTreeSet<String>>> {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/ARCHITECTURE.md"))
            .unwrap();
    let table = doc
        .split("## What each module may import")
        .nth(1)
        .expect("docs/ARCHITECTURE.md has a 'What each module may import' section");
    let ticked = |cell: &str| -> BTreeSet<String> {
        cell.split('`')
            .enumerate()
            .filter(|(i, _)| i % 2 == 1)
            .map(|(_, s)| s.to_string())
            .collect()
    };
    let mut out = BTreeMap::new();
    for line in table.lines().skip_while(|l| !l.starts_with('|')) {
        if !line.starts_with('|') {
            break;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').collect();
        let (Some(first), Some(last)) = (cells.first(), cells.last()) else {
            continue;
        };
        let Some(module) = ticked(first).into_iter().next() else {
            continue;
        };
        let may = if last.contains("every module") {
            None
        } else {
            Some(ticked(last))
        };
        out.insert(module, may);
    }
    out
}

#[test]
fn no_two_files_import_each_other() {
    let g = graph();
    assert!(g.len() > 50, "read only {} files", g.len());
    if let Some(c) = find_cycle(&g) {
        panic!("files import each other in a circle: {}", c.join(" -> "));
    }
}

#[test]
fn top_level_imports_are_the_ones_architecture_md_allows() {
    let rules = allowed();
    let mut wrong = Vec::new();
    for (file, deps) in graph() {
        let Some(top) = module_path(&file).first().cloned() else {
            continue; // lib.rs, main.rs
        };
        let Some(may) = rules.get(&top) else {
            wrong.push(format!(
                "src/{file}: module `{top}` has no row in docs/ARCHITECTURE.md"
            ));
            continue;
        };
        for d in deps {
            let Some(dtop) = module_path(&d).first().cloned() else {
                continue;
            };
            if dtop != top && may.as_ref().is_some_and(|m| !m.contains(&dtop)) {
                wrong.push(format!(
                    "src/{file} imports src/{d}: `{top}` may not import `{dtop}`"
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The parser itself, on the shapes of `use` this code base writes.
#[test]
fn use_trees_expand() {
    assert_eq!(
        expand("crate::a::{self, b, c::{d, e as f}}"),
        [
            "crate::a",
            "crate::a::b",
            "crate::a::c::d",
            "crate::a::c::e"
        ]
    );
    let found = imports(
        "report/sections/memory.rs",
        "use super::super::sizing::Report;\npub use crate::x::Y;\nfn f() { crate::units::group(1); }",
    );
    assert_eq!(
        found,
        [
            vec!["report".to_string(), "sizing".into(), "Report".into()],
            vec!["units".to_string(), "group".into()],
        ]
    );
}
