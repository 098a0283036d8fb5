//! Discovery: what a model source holds on disk, read without any lock held. A repository
//! folder's models (flat or in numbered version folders, with names fit for URLs and metric
//! labels), each model's `config.json` (its pinned version and version policy), the version to
//! serve and the others its policy serves, and the files each of those is made of (lengths and
//! modification times), so that the poller notices a change in place.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::config::{ModelOverrides, ModelSource, VersionPolicy};
use crate::metadata::ModelMetadata;

/// A model found on disk: its versions and their folders, the version to serve, and that
/// version's files as they were when the disk was read.
#[derive(Debug, Clone)]
pub(super) struct Found {
    pub(super) folder: PathBuf,
    pub(super) versions: BTreeMap<u64, PathBuf>,
    /// Pinned (`--model-version`, the model's `config.json`) or the highest served.
    pub(super) chosen: u64,
    pub(super) files: Fingerprint,
    /// The other versions its `version_policy` serves, with their files.
    pub(super) others: BTreeMap<u64, Fingerprint>,
}

pub(super) type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

pub(super) fn read_overrides(path: &Path) -> Result<ModelOverrides, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ModelOverrides::default()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Names a model folder may have: they become URL path segments and metric labels.
pub fn valid_model_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// The models of a repository folder: each subfolder holding `metadata.json` (version 1) or
/// numbered folders holding one. Other entries are skipped.
pub(super) fn discover_repository(root: &Path) -> Result<BTreeMap<String, Found>, String> {
    let entries = std::fs::read_dir(root)
        .map_err(|e| format!("reading the model repository {}: {e}", root.display()))?;
    let mut found = BTreeMap::new();
    for entry in entries.flatten() {
        let folder = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if !folder.is_dir() || name.starts_with('.') || name == "__pycache__" {
            continue;
        }
        let mut versions = BTreeMap::new();
        if let Ok(inner) = std::fs::read_dir(&folder) {
            for v in inner.flatten() {
                let number = v.file_name().to_str().and_then(|s| s.parse::<u64>().ok());
                if let Some(n) = number
                    && n > 0
                    && v.path().join("metadata.json").is_file()
                {
                    versions.insert(n, v.path());
                }
            }
        }
        if versions.is_empty() && folder.join("metadata.json").is_file() {
            versions.insert(1, folder.clone());
        }
        if versions.is_empty() {
            tracing::debug!(folder = %folder.display(), "not a model folder: skipped");
            continue;
        }
        if !valid_model_name(&name) {
            tracing::warn!(folder = %folder.display(), "a model folder's name must be letters, digits, '_', '-' or '.', at most 64 long: skipped");
            continue;
        }
        found.insert(
            name,
            Found {
                folder,
                versions,
                chosen: 0,
                files: Vec::new(),
                others: BTreeMap::new(),
            },
        );
    }
    Ok(found)
}

/// The models of the source, each with its chosen version and that version's files.
pub(super) fn scan(
    source: &ModelSource,
    pins: &HashMap<String, u64>,
) -> Result<BTreeMap<String, Found>, String> {
    let mut found = match source {
        ModelSource::Single(dir) => {
            let meta = ModelMetadata::load(dir).map_err(|e| format!("{e:#}"))?;
            BTreeMap::from([(
                meta.name,
                Found {
                    folder: dir.clone(),
                    versions: BTreeMap::from([(1, dir.clone())]),
                    chosen: 1,
                    files: Vec::new(),
                    others: BTreeMap::new(),
                },
            )])
        }
        ModelSource::Repository(root) => discover_repository(root)?,
    };
    for (name, model) in found.iter_mut() {
        let held: Vec<u64> = model.versions.keys().copied().collect();
        let overrides = read_overrides(&model.folder.join("config.json")).unwrap_or_default();
        let served = VersionPolicy::select(overrides.version_policy.as_ref(), &held);
        let highest = served
            .last()
            .or(held.last())
            .copied()
            .expect("a model has a version");
        let pinned = pins.get(name).copied().or(overrides.version);
        model.chosen = pinned.unwrap_or(highest);
        model.files = model
            .versions
            .get(&model.chosen)
            .map(|dir| files_of(&model.folder, dir))
            .unwrap_or_default();
        model.others = served
            .iter()
            .filter(|&&v| v != model.chosen)
            .filter_map(|v| Some((*v, files_of(&model.folder, model.versions.get(v)?))))
            .collect();
    }
    Ok(found)
}

/// The files a version is made of, with their lengths and modification times: those of its
/// folder, the model's `config.json` above a version folder, and the model file wherever
/// `metadata.json` puts it.
fn files_of(folder: &Path, dir: &Path) -> Fingerprint {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    if dir != folder {
        files.push(folder.join("config.json"));
    }
    if let Ok(meta) = ModelMetadata::load(dir) {
        files.push(meta.model_path(dir));
    }
    files.sort();
    files.dedup();
    files
        .into_iter()
        .map(|f| {
            let m = std::fs::metadata(&f).ok();
            let len = m.as_ref().map_or(0, |m| m.len());
            let mtime = m.and_then(|m| m.modified().ok());
            (f, len, mtime)
        })
        .collect()
}
