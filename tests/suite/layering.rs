//! The import drawing of `src/`: which top-level module (room) names which through `crate::`.
//! It must have no circle, every room must go down the floors `src/lib.rs` lists, and every
//! file must open with a comment saying what it owns.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The room a file belongs to: `src/api/predict.rs` -> `api`, `src/auth.rs` -> `auth`.
fn room(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src/");
    let first = rel.components().next().expect("a component");
    let name = first.as_os_str().to_string_lossy();
    name.trim_end_matches(".rs").to_string()
}

/// The rooms a source text names as `crate::room`, including `use crate::{a::x, b}` groups.
fn named_rooms(text: &str) -> BTreeSet<String> {
    let mut rooms = BTreeSet::new();
    // Comments are not imports.
    let code: String = text
        .lines()
        .map(|line| match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        let after = &rest[at + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            // The top-level names of the group, at brace depth 0.
            let mut depth = 0usize;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    _ => {}
                }
                if depth == 0 && c == ',' {
                    push_first(&item, &mut rooms);
                    item.clear();
                } else {
                    item.push(c);
                }
            }
            push_first(&item, &mut rooms);
        } else {
            push_first(after, &mut rooms);
        }
        rest = after;
    }
    rooms
}

fn push_first(path: &str, rooms: &mut BTreeSet<String>) {
    let name: String = path
        .trim_start()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    if !name.is_empty() {
        rooms.insert(name);
    }
}

/// The floors as `src/lib.rs` lists them, top first: `[`server`] (...); the doors [`api`] and
/// [`v2`]; ...`, one `;`-separated group per floor.
fn floors(lib: &str) -> Vec<BTreeSet<String>> {
    let doc: String = lib
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .collect::<Vec<_>>()
        .join(" ");
    let start = doc.find("Floors,").expect("src/lib.rs lists the floors");
    let list = &doc[start..];
    let list = &list[list.find(':').expect("Floors...:") + 1..];
    let list = &list[..list.find('.').unwrap_or(list.len())];
    list.split(';')
        .map(|floor| {
            floor
                .split("[`")
                .skip(1)
                .filter_map(|s| s.split("`]").next())
                .map(str::to_string)
                .collect()
        })
        .collect()
}

struct Drawing {
    edges: BTreeMap<String, BTreeSet<String>>,
    undocumented: Vec<PathBuf>,
}

fn draw() -> Drawing {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut undocumented = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read a source file");
        if !text.trim_start().starts_with("//!") {
            undocumented.push(file.clone());
        }
        let from = room(&src, &file);
        if from == "main" || from == "lib" {
            continue;
        }
        let to = edges.entry(from.clone()).or_default();
        to.extend(named_rooms(&text).into_iter().filter(|r| *r != from));
    }
    Drawing {
        edges,
        undocumented,
    }
}

/// A circle in the drawing, if there is one (depth-first search for a back edge).
fn find_circle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|n| n == node) {
            let mut circle = path[i..].to_vec();
            circle.push(node.to_string());
            return Some(circle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for node in edges.keys() {
        if let Some(c) = visit(node, edges, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

#[test]
fn the_parser_sees_grouped_and_plain_imports() {
    let text = "use crate::{config::{A, B}, telemetry::Metrics};\nuse crate::error::X;\n\
                // crate::server is only a comment\nlet y = crate::state::AppState::new();";
    let rooms: Vec<String> = named_rooms(text).into_iter().collect();
    assert_eq!(rooms, ["config", "error", "state", "telemetry"]);
    let mut circle = BTreeMap::new();
    circle.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    circle.insert("b".to_string(), BTreeSet::from(["a".to_string()]));
    assert!(find_circle(&circle).is_some());
}

#[test]
fn the_import_drawing_has_no_circle_and_goes_down_the_floors() {
    let drawing = draw();
    for (from, to) in &drawing.edges {
        println!(
            "LAYERING: {from} -> {}",
            to.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    if let Some(circle) = find_circle(&drawing.edges) {
        panic!("an import circle: {}", circle.join(" -> "));
    }

    let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs"))
        .expect("read src/lib.rs");
    let floors = floors(&lib);
    let floor_of = |room: &str| floors.iter().position(|f| f.contains(room));
    let mut upward = Vec::new();
    for (from, to) in &drawing.edges {
        let Some(here) = floor_of(from) else {
            upward.push(format!("{from} is on no floor of src/lib.rs"));
            continue;
        };
        for target in to {
            match floor_of(target) {
                Some(there) if there > here => {}
                Some(there) if there == here => {
                    // Rooms on one floor may use each other as long as there is no circle.
                }
                Some(_) => upward.push(format!("{from} imports {target}, a floor above it")),
                None => upward.push(format!("{target} (imported by {from}) is on no floor")),
            }
        }
    }
    assert!(upward.is_empty(), "imports against the floors: {upward:#?}");
    assert!(
        drawing.undocumented.is_empty(),
        "files without an opening //! comment: {:?}",
        drawing.undocumented
    );
}
