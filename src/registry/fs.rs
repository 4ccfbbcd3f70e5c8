//! The registry in a data directory: `blobs/<sha256>.wasm` and
//! `tenants/<tenant>.json`. Writes go to a temporary file that is renamed
//! into place, so a crash leaves the old or the new document, never half.
//! One process owns the directory; replicas share Redis instead.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use super::model::TenantIndex;
use super::store::{Store, StoreError};

pub struct FsStore {
    root: PathBuf,
    /// Serialises compare-and-swap within this process.
    write: Mutex<()>,
}

impl FsStore {
    pub fn open(root: &Path) -> Result<FsStore, StoreError> {
        for sub in ["blobs", "tenants"] {
            std::fs::create_dir_all(root.join(sub)).map_err(|e| {
                StoreError::Unavailable(format!("cannot create {}: {e}", root.join(sub).display()))
            })?;
        }
        Ok(FsStore {
            root: root.to_owned(),
            write: Mutex::new(()),
        })
    }

    fn blob_path(&self, sha256: &str) -> Result<PathBuf, StoreError> {
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(StoreError::Corrupt(format!("not a sha256: {sha256:?}")));
        }
        Ok(self.root.join("blobs").join(format!("{sha256}.wasm")))
    }

    fn index_path(&self, tenant: &str) -> PathBuf {
        // Tenant ids are restricted by config validation to a file-safe set.
        self.root.join("tenants").join(format!("{tenant}.json"))
    }

    pub fn has_blob(&self, sha256: &str) -> bool {
        self.blob_path(sha256).is_ok_and(|p| p.is_file())
    }

    /// Overwrite a tenant's index without the revision check: for a local
    /// mirror of a shared store, which must follow the store whatever it says.
    pub fn mirror_index(&self, tenant: &str, index: &TenantIndex) -> Result<(), StoreError> {
        let _w = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        self.write_json(tenant, index)
    }

    fn write_json(&self, tenant: &str, index: &TenantIndex) -> Result<(), StoreError> {
        let text = serde_json::to_vec_pretty(index)
            .map_err(|e| StoreError::Corrupt(format!("cannot encode index: {e}")))?;
        atomic_write(&self.index_path(tenant), &text)
    }
}

/// Write to a temporary file of its own, fsync, rename over `path`, fsync
/// the directory: after a crash the old or the new content is there.
fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    use std::io::Write;
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let tmp = path.with_extension(format!(
        "tmp.{}.{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let io = |e: std::io::Error| StoreError::Unavailable(format!("{}: {e}", path.display()));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok(())
}

impl Store for FsStore {
    fn put_blob(&self, sha256: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.blob_path(sha256)?;
        if path.is_file() {
            return Ok(());
        }
        atomic_write(&path, bytes)
    }

    fn get_blob(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match std::fs::read(self.blob_path(sha256)?) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::Unavailable(e.to_string())),
        }
    }

    fn read_index(&self, tenant: &str) -> Result<Option<TenantIndex>, StoreError> {
        let path = self.index_path(tenant);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::Unavailable(format!("{}: {e}", path.display()))),
        }
    }

    fn write_index(&self, tenant: &str, next: &TenantIndex) -> Result<bool, StoreError> {
        let _w = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.read_index(tenant)?.map_or(0, |i| i.revision);
        if current + 1 != next.revision {
            return Ok(false);
        }
        self.write_json(tenant, next)?;
        Ok(true)
    }

    fn revisions(&self) -> Result<HashMap<String, u64>, StoreError> {
        let dir = self.root.join("tenants");
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", dir.display())))?;
        let mut out = HashMap::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let Some(tenant) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            if let Some(index) = self.read_index(tenant)? {
                out.insert(tenant.to_owned(), index.revision);
            }
        }
        Ok(out)
    }

    fn location(&self) -> String {
        format!("directory {}", self.root.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_and_swap_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        assert_eq!(store.read_index("acme").unwrap(), None);
        let mut idx = TenantIndex {
            revision: 1,
            ..Default::default()
        };
        assert!(store.write_index("acme", &idx).unwrap());
        // A second writer that read revision 0 loses.
        assert!(!store.write_index("acme", &idx).unwrap());
        idx.revision = 2;
        assert!(store.write_index("acme", &idx).unwrap());
        let sha = "ab".repeat(32);
        store.put_blob(&sha, b"wasm").unwrap();
        store.put_blob(&sha, b"wasm").unwrap();

        let again = FsStore::open(dir.path()).unwrap();
        assert_eq!(again.read_index("acme").unwrap().unwrap().revision, 2);
        assert_eq!(again.get_blob(&sha).unwrap().as_deref(), Some(&b"wasm"[..]));
        assert_eq!(again.revisions().unwrap().get("acme"), Some(&2));
        assert!(again.get_blob("../etc").is_err());
    }
}
