//! The module graph has no circles.
//!
//! Reads the source trees of the library and the benchmark and extracts, per module file, the
//! modules it refers to: `use crate::…`, `use super::…`, `use self::…`, paths written inline
//! (`crate::api::Limits`, `incoming::serve_peers` for a child module) and `use` trees with
//! braces. A file is a module (inline modules such as `mod tests { … }` belong to their
//! file); a path resolves to the longest module file it names, so `crate::daemon::Daemon`
//! is an edge to `daemon/mod.rs` and `crate::daemon::incoming::serve_peers` one to
//! `daemon/incoming.rs`. A child importing its parent's items is an edge child → parent;
//! declaring `mod child;` is not an edge. Then every strongly connected component must be a
//! single module.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;

#[test]
fn library_modules_import_in_one_direction() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    assert_acyclic(&src, "lib.rs");
}

#[test]
fn benchmark_modules_import_in_one_direction() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../migproxy-bench/src");
    assert_acyclic(&src, "main.rs");
}

#[test]
fn the_checker_sees_a_circle() {
    let files = BTreeMap::from([
        (vec![], "mod a; mod b;".to_owned()),
        (m("a"), "use crate::b::Thing; mod c;".to_owned()),
        (
            m("b"),
            "pub struct Thing; fn f() { super::a::c::g() }".to_owned(),
        ),
        (
            vec!["a".into(), "c".into()],
            "pub fn g() {} #[cfg(test)] mod tests { use super::*; use super::super::X; }"
                .to_owned(),
        ),
    ]);
    let graph = edges(&files);
    assert_eq!(graph[&m("a")], BTreeSet::from([m("b")]));
    assert_eq!(
        graph[&m("b")],
        BTreeSet::from([vec!["a".into(), "c".into()]])
    );
    let circles = circles(&graph);
    assert_eq!(circles.len(), 1, "{circles:?}");
}

fn m(name: &str) -> Module {
    vec![name.to_owned()]
}

fn assert_acyclic(src: &Path, root: &str) {
    let files = read_tree(src, root);
    assert!(files.len() > 3, "no sources under {}", src.display());
    let graph = edges(&files);
    let circles = circles(&graph);
    let described: Vec<String> = circles
        .iter()
        .map(|component| describe(component, &graph))
        .collect();
    assert!(
        described.is_empty(),
        "modules that import each other (directly or through others):\n{}",
        described.join("\n")
    );
}

fn describe(component: &BTreeSet<Module>, graph: &BTreeMap<Module, BTreeSet<Module>>) -> String {
    let mut lines = Vec::new();
    for from in component {
        for to in graph[from].iter().filter(|to| component.contains(*to)) {
            lines.push(format!("  {} -> {}", name(from), name(to)));
        }
    }
    format!("circle:\n{}", lines.join("\n"))
}

fn name(module: &Module) -> String {
    if module.is_empty() {
        "crate".to_owned()
    } else {
        module.join("::")
    }
}

/// Every module file under `src`, by module path, with its text.
fn read_tree(src: &Path, root: &str) -> BTreeMap<Module, String> {
    let mut files = BTreeMap::new();
    let mut pending: Vec<PathBuf> = vec![src.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).expect("read source directory") {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            if path.extension().is_none_or(|ext| ext != "rs") {
                continue;
            }
            let relative = path.strip_prefix(src).expect("under src");
            let Some(module) = module_of(relative, root) else {
                continue;
            };
            let text = std::fs::read_to_string(&path).expect("read source");
            files.insert(module, text);
        }
    }
    files
}

/// `daemon/mod.rs` → `daemon`, `daemon/peer.rs` → `daemon::peer`, the root → the crate.
fn module_of(relative: &Path, root: &str) -> Option<Module> {
    let mut parts: Vec<String> = relative
        .iter()
        .map(|part| part.to_string_lossy().into_owned())
        .collect();
    let file = parts.pop()?;
    if parts.is_empty() && file == root {
        return Some(Vec::new());
    }
    if parts.is_empty() && (file == "main.rs" || file == "lib.rs") {
        return None; // the other crate root (the binary beside the library)
    }
    let stem = file.strip_suffix(".rs")?;
    if stem != "mod" {
        parts.push(stem.to_owned());
    }
    Some(parts)
}

/// The modules each module refers to (itself excluded).
fn edges(files: &BTreeMap<Module, String>) -> BTreeMap<Module, BTreeSet<Module>> {
    let known: BTreeSet<&Module> = files.keys().collect();
    files
        .iter()
        .map(|(module, text)| {
            let targets = references(module, text, &known)
                .into_iter()
                .filter(|target| target != module)
                .collect();
            (module.clone(), targets)
        })
        .collect()
}

fn references(module: &Module, text: &str, known: &BTreeSet<&Module>) -> BTreeSet<Module> {
    let tokens = tokens(&strip(text));
    let children: BTreeSet<&str> = known
        .iter()
        .filter(|k| k.len() == module.len() + 1 && k.starts_with(module))
        .filter_map(|k| k.last().map(String::as_str))
        .collect();
    let mut found = BTreeSet::new();
    let mut inline: Vec<(String, usize)> = Vec::new(); // inline modules open, and their depth
    let mut depth = 0usize;
    let mut i = 0;
    while i < tokens.len() {
        let token = tokens[i].as_str();
        match token {
            "{" => depth += 1,
            "}" => {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
            }
            "mod" if tokens.get(i + 2).is_some_and(|t| t == "{") => {
                inline.push((tokens[i + 1].clone(), depth));
            }
            _ => {}
        }
        let here: Module = module
            .iter()
            .cloned()
            .chain(inline.iter().map(|(name, _)| name.clone()))
            .collect();
        if token == "use" {
            let end = tokens[i..]
                .iter()
                .position(|t| t == ";")
                .map_or(tokens.len(), |p| i + p);
            for path in use_paths(&tokens[i + 1..end]) {
                if let Some(target) = resolve(&here, &path, &children, known) {
                    found.insert(target);
                }
            }
            i = end;
            continue;
        }
        let starts_path = is_ident(token)
            && tokens.get(i + 1).is_some_and(|t| t == "::")
            && (i == 0 || tokens[i - 1] != "::");
        if starts_path {
            let mut path = vec![token.to_owned()];
            let mut j = i + 1;
            while tokens.get(j).is_some_and(|t| t == "::")
                && tokens.get(j + 1).is_some_and(|t| is_ident(t))
            {
                path.push(tokens[j + 1].clone());
                j += 2;
            }
            if let Some(target) = resolve(&here, &path, &children, known) {
                found.insert(target);
            }
            i = j;
            continue;
        }
        i += 1;
    }
    found
}

/// A path as written in module `here` (inline modules included), to the module file it names.
fn resolve(
    here: &Module,
    path: &[String],
    children: &BTreeSet<&str>,
    known: &BTreeSet<&Module>,
) -> Option<Module> {
    let first = path.first()?.as_str();
    let (mut base, mut rest) = match first {
        "crate" => (Vec::new(), &path[1..]),
        "self" => (here.clone(), &path[1..]),
        "super" => (here.clone(), path),
        name if children.contains(name) => (here.clone(), path),
        _ => return None,
    };
    while rest.first().is_some_and(|s| s == "super") {
        base.pop()?;
        rest = &rest[1..];
    }
    let full: Module = base.into_iter().chain(rest.iter().cloned()).collect();
    (0..=full.len())
        .rev()
        .map(|n| full[..n].to_vec())
        .find(|prefix| known.contains(prefix))
}

/// The paths of a `use` tree (tokens after `use`), braces expanded; `self` in braces is
/// the prefix itself.
fn use_paths(tokens: &[String]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut i = 0;
    if tokens.first().is_some_and(|t| t == "::") {
        return out; // ::external_crate
    }
    expand(tokens, &mut i, &[], &mut out);
    out
}

fn expand(tokens: &[String], i: &mut usize, prefix: &[String], out: &mut Vec<Vec<String>>) {
    let mut path = prefix.to_vec();
    while *i < tokens.len() {
        let token = tokens[*i].as_str();
        *i += 1;
        match token {
            "{" => {
                loop {
                    expand(tokens, i, &path, out);
                    match tokens.get(*i).map(String::as_str) {
                        Some(",") => *i += 1,
                        Some("}") => {
                            *i += 1;
                            break;
                        }
                        _ => break,
                    }
                    if tokens.get(*i).is_some_and(|t| t == "}") {
                        *i += 1;
                        break;
                    }
                }
                return;
            }
            "::" => {}
            "as" => {
                *i += 1; // the alias
                break;
            }
            "self" if !path.is_empty() => {}
            "*" => break,
            "," | "}" => {
                *i -= 1;
                break;
            }
            name => path.push(name.to_owned()),
        }
    }
    if !path.is_empty() {
        out.push(path);
    }
}

fn is_ident(token: &str) -> bool {
    token
        .chars()
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_')
}

/// Identifiers, `::` and single punctuation characters.
fn tokens(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push(chars[start..i].iter().collect());
        } else if c == ':' && chars.get(i + 1) == Some(&':') {
            out.push("::".to_owned());
            i += 2;
        } else {
            if !c.is_whitespace() {
                out.push(c.to_string());
            }
            i += 1;
        }
    }
    out
}

/// The text without comments, string literals and character literals.
fn strip(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let rest = &chars[i..];
        if rest.starts_with(&['/', '/']) {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if rest.starts_with(&['/', '*']) {
            let mut nesting = 0;
            while i < chars.len() {
                if chars[i..].starts_with(&['/', '*']) {
                    nesting += 1;
                    i += 2;
                } else if chars[i..].starts_with(&['*', '/']) {
                    nesting -= 1;
                    i += 2;
                    if nesting == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if let Some(len) = raw_string(rest) {
            i += len;
            out.push_str("\"\"");
        } else if chars[i] == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if let Some(len) = char_literal(rest) {
            i += len;
            out.push_str("' '");
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

/// The length of a raw string literal (`r"…"`, `r#"…"#`, `br"…"`) starting here.
fn raw_string(rest: &[char]) -> Option<usize> {
    let mut i = usize::from(rest.first() == Some(&'b'));
    if rest.get(i) != Some(&'r') {
        return None;
    }
    i += 1;
    let hashes = rest[i..].iter().take_while(|c| **c == '#').count();
    i += hashes;
    if rest.get(i) != Some(&'"') {
        return None;
    }
    i += 1;
    while i < rest.len() {
        if rest[i] == '"'
            && rest[i + 1..]
                .iter()
                .take(hashes)
                .filter(|c| **c == '#')
                .count()
                == hashes
        {
            return Some(i + 1 + hashes);
        }
        i += 1;
    }
    Some(rest.len())
}

/// The length of a character literal (`'x'`, `'\n'`, `'\''`, `'\u{1F600}'`) starting here;
/// `None` for a lifetime.
fn char_literal(rest: &[char]) -> Option<usize> {
    if rest.first() != Some(&'\'') {
        return None;
    }
    if rest.get(1) == Some(&'\\') {
        let close = rest[2..].iter().position(|c| *c == '\'')?;
        return Some(close + 3);
    }
    (rest.get(2) == Some(&'\'')).then_some(3)
}

/// Strongly connected components of more than one module (Tarjan).
fn circles(graph: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<BTreeSet<Module>> {
    struct Walk<'a> {
        graph: &'a BTreeMap<Module, BTreeSet<Module>>,
        index: BTreeMap<&'a Module, usize>,
        low: BTreeMap<&'a Module, usize>,
        stack: Vec<&'a Module>,
        on_stack: BTreeSet<&'a Module>,
        found: Vec<BTreeSet<Module>>,
    }
    impl<'a> Walk<'a> {
        fn visit(&mut self, node: &'a Module) {
            let n = self.index.len();
            self.index.insert(node, n);
            self.low.insert(node, n);
            self.stack.push(node);
            self.on_stack.insert(node);
            let graph = self.graph;
            for next in graph.get(node).into_iter().flatten() {
                if !graph.contains_key(next) {
                    continue;
                }
                if !self.index.contains_key(next) {
                    self.visit(next);
                    let low = self.low[node].min(self.low[next]);
                    self.low.insert(node, low);
                } else if self.on_stack.contains(next) {
                    let low = self.low[node].min(self.index[next]);
                    self.low.insert(node, low);
                }
            }
            if self.low[node] == self.index[node] {
                let mut component = BTreeSet::new();
                while let Some(top) = self.stack.pop() {
                    self.on_stack.remove(top);
                    component.insert(top.clone());
                    if top == node {
                        break;
                    }
                }
                if component.len() > 1 {
                    self.found.push(component);
                }
            }
        }
    }
    let mut walk = Walk {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for node in graph.keys() {
        if !walk.index.contains_key(node) {
            walk.visit(node);
        }
    }
    walk.found
}
