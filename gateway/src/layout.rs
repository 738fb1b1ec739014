//! The data directory's layout record: how many shards its conversations are spread over, and
//! by which function (`starling_router::ids::owner_shard`).
//!
//! A conversation lives in the log of shard `owner_shard(conv, shards)`. Starting on the same
//! data with another shard count would look for existing conversations on the wrong shards:
//! their history would vanish and their seqs start again at 1. So the count is recorded when
//! the directory is first used, and a start that asks for another count is refused before
//! anything else in the directory is opened.
//!
//! The record is a small TOML file, `<data>/layout.toml`, written once with
//! [`crate::fsutil::write_atomic`]:
//!
//! ```toml
//! format = 1
//! shards = 2
//! owner_shard = "mix64-mod/1"
//! ```
//!
//! It is a file rather than a key in `meta.redb` because it must be read before any store is
//! opened: opening `meta.redb` or a shard's log can write (redb's repair, the log's torn-tail
//! truncation, a missing shard directory created), and a refused start must leave the data
//! exactly as it was. A file can also be read by an operator and by tools without the server.
//!
//! Resolution ([`resolve`]): a recorded count is used when the configuration leaves the count
//! automatic (`shards = 0`, one per core), so a data dir moved to a machine with another core
//! count keeps its layout; an explicit count must equal it. A directory from before the record
//! existed has `shards/0` .. `shards/<n-1>` (every start created all of them): `n` is inferred
//! and recorded. A new directory records the configured count.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use starling_router::ids::OWNER_SHARD_MAPPING;

use crate::fsutil::{FsError, write_atomic};

/// The record's file name in the data directory.
pub const FILE: &str = "layout.toml";

/// The record format this server writes and reads.
const FORMAT: u32 = 1;

/// Most shards a data directory may record (as `Config::validate` allows).
const SHARDS_MAX: usize = 1024;

/// The record as stored.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    format: u32,
    shards: usize,
    owner_shard: String,
}

impl Record {
    fn to_toml(&self) -> String {
        format!(
            "# How this data directory's conversations map to shards. Written once; do not edit:\n\
             # starting with another shard count would hide existing conversations.\n\
             format = {}\nshards = {}\nowner_shard = \"{}\"\n",
            self.format, self.shards, self.owner_shard
        )
    }
}

/// Where the shard count in use came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Read from `layout.toml`.
    Recorded,
    /// Counted from the `shards/<i>` directories of a data dir without a record, and recorded.
    Inferred,
    /// A new data directory: the configured count, recorded.
    New,
}

/// The layout a start runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Number of shards.
    pub shards: usize,
    /// Where that number came from.
    pub origin: Origin,
}

/// Why a data directory's layout was refused.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// The configuration asks for another shard count than the data holds.
    #[error(
        "the data dir {dir} holds {held} shards ({source_of_count}) but this start asks for \
         {configured}: start with --shards {held} (or shards = {held} in the config, or shards = 0 \
         to use the data dir's count); changing the shard count of existing data is not \
         supported yet"
    )]
    CountMismatch {
        /// The data directory.
        dir: PathBuf,
        /// Shards the data is spread over.
        held: usize,
        /// Shards the configuration asks for.
        configured: usize,
        /// "recorded in …" or "found shards/0 .. shards/n-1".
        source_of_count: String,
    },
    /// The record names a mapping or format this server does not know.
    #[error(
        "{path} records format {format} and shard mapping {mapping:?}; this starling knows \
         format {FORMAT} and mapping {OWNER_SHARD_MAPPING:?} (was the data dir written by \
         another version?)"
    )]
    Unsupported {
        /// The record.
        path: PathBuf,
        /// Its format.
        format: u32,
        /// Its mapping.
        mapping: String,
    },
    /// The record cannot be read or parsed.
    #[error("cannot read the layout record {path}: {reason}")]
    Unreadable {
        /// The record.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The `shards/` directory does not match a layout (a gap, or shards beyond the record).
    #[error("the shard directories in {dir} do not match the layout: {reason}")]
    Directories {
        /// `<data>/shards`.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The record could not be written.
    #[error("cannot record the layout")]
    Write(#[from] FsError),
}

/// Decides the shard count for `data_dir` (which must exist) and records it if it was not yet.
///
/// `configured` is the configuration's `shards` (0: automatic) and `auto` the count automatic
/// means on this machine.
///
/// # Errors
/// The configured count differs from the data's, the record or the `shards/` directories are
/// inconsistent, or the record could not be written.
pub fn resolve(data_dir: &Path, configured: usize, auto: usize) -> Result<Layout, LayoutError> {
    let path = data_dir.join(FILE);
    let shard_dirs = shard_dirs(&data_dir.join("shards"))?;
    let (held, origin, source_of_count) = match read(&path)? {
        Some(r) => {
            if r.format != FORMAT || r.owner_shard != OWNER_SHARD_MAPPING {
                return Err(LayoutError::Unsupported {
                    path,
                    format: r.format,
                    mapping: r.owner_shard,
                });
            }
            if r.shards == 0 || r.shards > SHARDS_MAX {
                return Err(LayoutError::Unreadable {
                    path,
                    reason: format!("shards = {} is not between 1 and {SHARDS_MAX}", r.shards),
                });
            }
            if let Some(&extra) = shard_dirs.iter().find(|&&i| i >= r.shards) {
                return Err(LayoutError::Directories {
                    dir: data_dir.join("shards"),
                    reason: format!(
                        "shards/{extra} exists but {} records {} shards (was it started with \
                         another shard count by a version that did not check?)",
                        path.display(),
                        r.shards
                    ),
                });
            }
            let from = format!("recorded in {}", path.display());
            (r.shards, Origin::Recorded, from)
        }
        None if !shard_dirs.is_empty() => {
            let n = shard_dirs.len();
            if let Some(gap) = (0..n).find(|i| !shard_dirs.contains(i)) {
                return Err(LayoutError::Directories {
                    dir: data_dir.join("shards"),
                    reason: format!(
                        "shards/{gap} is missing but shards/{} exists, so the shard count \
                         cannot be inferred",
                        shard_dirs.iter().max().copied().unwrap_or(0)
                    ),
                });
            }
            let from = format!("found shards/0 .. shards/{}", n - 1);
            (n, Origin::Inferred, from)
        }
        None => {
            let n = if configured == 0 { auto } else { configured };
            (n, Origin::New, String::new())
        }
    };
    if configured != 0 && configured != held {
        return Err(LayoutError::CountMismatch {
            dir: data_dir.to_owned(),
            held,
            configured,
            source_of_count,
        });
    }
    if origin != Origin::Recorded {
        let r = Record {
            format: FORMAT,
            shards: held,
            owner_shard: OWNER_SHARD_MAPPING.to_owned(),
        };
        write_atomic(&path, r.to_toml().as_bytes(), 0o644)?;
    }
    Ok(Layout {
        shards: held,
        origin,
    })
}

/// The record, if the file exists.
fn read(path: &Path) -> Result<Option<Record>, LayoutError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(LayoutError::Unreadable {
                path: path.to_owned(),
                reason: e.to_string(),
            });
        }
    };
    toml::from_str(&text)
        .map(Some)
        .map_err(|e| LayoutError::Unreadable {
            path: path.to_owned(),
            reason: e.message().to_owned(),
        })
}

/// The shard numbers of the directories `dir/<i>` (canonical decimal names; anything else in
/// `dir` is not a shard and is ignored), sorted.
fn shard_dirs(dir: &Path) -> Result<Vec<usize>, LayoutError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(LayoutError::Directories {
                dir: dir.to_owned(),
                reason: e.to_string(),
            });
        }
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| LayoutError::Directories {
            dir: dir.to_owned(),
            reason: e.to_string(),
        })?;
        let name = entry.file_name();
        let Some(i) = name.to_str().and_then(|s| {
            s.parse::<usize>()
                .ok()
                .filter(|i| i.to_string() == s && *i < SHARDS_MAX)
        }) else {
            continue;
        };
        if entry.path().is_dir() {
            out.push(i);
        }
    }
    out.sort_unstable();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with_shards(n: usize) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for i in 0..n {
            std::fs::create_dir_all(d.path().join("shards").join(i.to_string())).unwrap();
        }
        d
    }

    fn recorded(d: &Path) -> Record {
        read(&d.join(FILE)).unwrap().unwrap()
    }

    #[test]
    fn a_new_dir_records_the_configured_or_automatic_count() {
        let d = dir_with_shards(0);
        let l = resolve(d.path(), 3, 8).unwrap();
        assert_eq!((l.shards, l.origin), (3, Origin::New));
        assert_eq!(recorded(d.path()).shards, 3);
        assert_eq!(recorded(d.path()).owner_shard, OWNER_SHARD_MAPPING);
        let d = dir_with_shards(0);
        assert_eq!(resolve(d.path(), 0, 8).unwrap().shards, 8);
        assert_eq!(recorded(d.path()).shards, 8);
    }

    #[test]
    fn a_recorded_count_is_kept_by_auto_and_refused_to_another_explicit_count() {
        let d = dir_with_shards(0);
        resolve(d.path(), 2, 8).unwrap();
        let l = resolve(d.path(), 0, 8).unwrap();
        assert_eq!((l.shards, l.origin), (2, Origin::Recorded));
        assert_eq!(resolve(d.path(), 2, 1).unwrap().shards, 2);
        let before = std::fs::read(d.path().join(FILE)).unwrap();
        let e = resolve(d.path(), 1, 8).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(
            e,
            LayoutError::CountMismatch {
                held: 2,
                configured: 1,
                ..
            }
        ));
        assert!(msg.contains("holds 2 shards"), "{msg}");
        assert!(msg.contains("asks for 1"), "{msg}");
        assert!(msg.contains("--shards 2"), "{msg}");
        assert!(msg.contains("not supported yet"), "{msg}");
        assert_eq!(std::fs::read(d.path().join(FILE)).unwrap(), before);
    }

    #[test]
    fn a_legacy_dir_is_inferred_and_recorded() {
        let d = dir_with_shards(3);
        std::fs::write(d.path().join("shards/README"), b"").unwrap();
        std::fs::create_dir(d.path().join("shards/007")).unwrap();
        let l = resolve(d.path(), 0, 1).unwrap();
        assert_eq!((l.shards, l.origin), (3, Origin::Inferred));
        assert_eq!(recorded(d.path()).shards, 3);
        assert_eq!(resolve(d.path(), 0, 1).unwrap().origin, Origin::Recorded);

        // An explicit other count is refused, and nothing is recorded.
        let d = dir_with_shards(2);
        let e = resolve(d.path(), 1, 1).unwrap_err().to_string();
        assert!(e.contains("found shards/0 .. shards/1"), "{e}");
        assert!(!d.path().join(FILE).exists());
    }

    #[test]
    fn gaps_extra_shards_and_bad_records_are_refused() {
        let d = dir_with_shards(1);
        std::fs::create_dir(d.path().join("shards/2")).unwrap();
        let e = resolve(d.path(), 0, 1).unwrap_err().to_string();
        assert!(e.contains("shards/1 is missing"), "{e}");

        let d = dir_with_shards(0);
        resolve(d.path(), 2, 1).unwrap();
        std::fs::create_dir_all(d.path().join("shards/2")).unwrap();
        let e = resolve(d.path(), 0, 1).unwrap_err().to_string();
        assert!(e.contains("shards/2 exists"), "{e}");

        for (text, want) in [
            ("", "missing field"),
            (
                "format = 1\nshards = 0\nowner_shard = \"mix64-mod/1\"\n",
                "between 1",
            ),
            (
                "format = 1\nshards = 2\nowner_shard = \"other/9\"\n",
                "other/9",
            ),
            (
                "format = 2\nshards = 2\nowner_shard = \"mix64-mod/1\"\n",
                "format 2",
            ),
            (
                "format = 1\nshards = 2\nowner_shard = \"x\"\nextra = 1\n",
                "unknown field",
            ),
        ] {
            let d = dir_with_shards(0);
            std::fs::write(d.path().join(FILE), text).unwrap();
            let e = resolve(d.path(), 0, 1).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(e.contains(FILE), "{e}");
        }
    }
}
