//! Where the registry keeps its data: content-addressed blobs and one index
//! document per tenant. Two implementations: [`super::fs::FsStore`] (a data
//! directory; one replica) and [`super::redis::RedisStore`] (shared by every
//! replica). Calls block; the registry makes them off the async runtime.

use std::collections::HashMap;

use super::model::TenantIndex;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or refused the operation; worth retrying.
    #[error("registry store unavailable: {0}")]
    Unavailable(String),
    /// The store answered with something that is not a valid index or blob.
    #[error("registry store holds invalid data: {0}")]
    Corrupt(String),
}

pub trait Store: Send + Sync + 'static {
    /// Keep `bytes` under their sha256 (hex). Storing the same blob twice is
    /// not an error.
    fn put_blob(&self, sha256: &str, bytes: &[u8]) -> Result<(), StoreError>;

    /// The blob with this sha256, if stored.
    fn get_blob(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// The tenant's index, or `None` when it never had one.
    fn read_index(&self, tenant: &str) -> Result<Option<TenantIndex>, StoreError>;

    /// Compare-and-swap: store `next` only when the stored index's revision
    /// is `next.revision - 1` (no stored index counts as revision 0).
    /// `Ok(false)` means another writer got there first; the caller re-reads
    /// and retries. A successful write also updates [`Store::revisions`].
    fn write_index(&self, tenant: &str, next: &TenantIndex) -> Result<bool, StoreError>;

    /// Every tenant's current index revision, read in one cheap call: what a
    /// replica polls to learn what changed.
    fn revisions(&self) -> Result<HashMap<String, u64>, StoreError>;

    /// Where the data lives, for logs and `/readyz` (no secrets).
    fn location(&self) -> String;
}
