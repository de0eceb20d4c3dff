//! What a local install keeps about its cloud, under `<data>/sync/` (folder 0700, files 0600):
//!
//! - `cloud.json`: the cloud's URL, the API key, and the users to sync (written by
//!   `maestra sync setup`; the server reads it, so no key is ever in a service unit file);
//! - `origin`: this install's id, made once;
//! - `state.json`: how far sync has got (see `local::State`), written after what it covers is
//!   durable.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, anyhow};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::domain::{OriginId, UserId};
use crate::store::create_private_dir;

/// `<data>/sync`.
pub fn sync_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("sync")
}

/// The cloud a local install syncs with.
#[derive(Clone)]
pub struct CloudLink {
    pub url: reqwest::Url,
    pub api_key: SecretString,
    /// Synced besides the users who have conversations here (a new install has none yet).
    pub users: Vec<UserId>,
}

impl std::fmt::Debug for CloudLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudLink")
            .field("url", &self.url.as_str())
            .field("users", &self.users)
            .finish_non_exhaustive()
    }
}

/// `cloud.json` as written.
#[derive(Serialize, Deserialize)]
struct LinkFile {
    url: String,
    api_key: String,
    #[serde(default)]
    users: Vec<UserId>,
}

impl CloudLink {
    fn path(data_dir: &Path) -> PathBuf {
        sync_dir(data_dir).join("cloud.json")
    }

    /// The link `maestra sync setup` saved, if any; when it was saved (a new key is news).
    pub fn load(data_dir: &Path) -> anyhow::Result<Option<(CloudLink, SystemTime)>> {
        let path = Self::path(data_dir);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let saved = fs::metadata(&path)?.modified()?;
        let file: LinkFile = serde_json::from_str(&text).map_err(|e| {
            anyhow!(
                "{}: not a sync link ({e}); run `maestra sync setup` again",
                path.display()
            )
        })?;
        let url = parse_url(&file.url)
            .map_err(|e| anyhow!("{}: {e}; run `maestra sync setup` again", path.display()))?;
        Ok(Some((
            CloudLink {
                url,
                api_key: SecretString::from(file.api_key),
                users: file.users,
            },
            saved,
        )))
    }

    /// Saves the link whole (0600), replacing any earlier one.
    pub fn save(&self, data_dir: &Path) -> anyhow::Result<()> {
        let file = LinkFile {
            url: self.url.to_string(),
            api_key: self.api_key.expose_secret().to_owned(),
            users: self.users.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&file)?;
        let dir = sync_dir(data_dir);
        create_private_dir(&dir)?;
        write_atomically(&Self::path(data_dir), &bytes)
            .with_context(|| format!("cannot write {}", Self::path(data_dir).display()))
    }

    /// Removes the link: sync stops.
    pub fn remove(data_dir: &Path) -> anyhow::Result<bool> {
        match fs::remove_file(Self::path(data_dir)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// `path` under the cloud's URL (which may itself have a path).
    pub fn endpoint(&self, path: &str) -> reqwest::Url {
        let mut url = self.url.clone();
        let base = url.path().trim_end_matches('/').to_owned();
        url.set_path(&format!("{base}{path}"));
        url
    }
}

/// A cloud URL: http or https, with a host, no credentials in it.
pub fn parse_url(text: &str) -> Result<reqwest::Url, String> {
    let url =
        reqwest::Url::parse(text.trim()).map_err(|e| format!("{text:?} is not a URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(format!("{text:?} is not an http(s) URL with a host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("the URL must not hold credentials (the key is asked for apart)".to_owned());
    }
    Ok(url)
}

/// This install's id, made (and kept) on first use.
pub fn origin(data_dir: &Path) -> anyhow::Result<OriginId> {
    let dir = sync_dir(data_dir);
    let path = dir.join("origin");
    match fs::read_to_string(&path) {
        Ok(text) => {
            return OriginId::parse(text.trim()).map_err(|e| anyhow!("{}: {e}", path.display()));
        }
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("cannot read {}", path.display()));
        }
        Err(_) => {}
    }
    create_private_dir(&dir)?;
    let id = format!("inst_{}", uuid::Uuid::now_v7().simple());
    write_atomically(&path, id.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(OriginId::parse(&id)?)
}

/// Writes `bytes` to `path` whole or not at all, durably, readable by its owner only.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let temp = path.with_extension("tmp");
    let mut file = File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&temp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_saved_link_reads_back_private_and_its_debug_shows_no_key() {
        let data = tempfile::tempdir().unwrap();
        let link = CloudLink {
            url: parse_url("https://cloud.example/base").unwrap(),
            api_key: SecretString::from("mk_secret_value_123".to_owned()),
            users: vec![UserId::parse("ana").unwrap()],
        };
        link.save(data.path()).unwrap();
        let (read, _) = CloudLink::load(data.path()).unwrap().unwrap();
        assert_eq!(read.api_key.expose_secret(), "mk_secret_value_123");
        assert_eq!(read.users, link.users);
        assert_eq!(
            read.endpoint("/api/maestra/sync/pull").as_str(),
            "https://cloud.example/base/api/maestra/sync/pull"
        );
        let mode = |p: PathBuf| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(CloudLink::path(data.path())), 0o600);
        assert_eq!(mode(sync_dir(data.path())), 0o700);
        assert!(!format!("{read:?}").contains("secret"));
    }

    #[test]
    fn urls_that_are_not_http_or_hold_credentials_are_refused() {
        for bad in ["ftp://x", "not a url", "https://user:pw@host", "http://"] {
            assert!(parse_url(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn the_origin_is_made_once_and_kept() {
        let data = tempfile::tempdir().unwrap();
        let first = origin(data.path()).unwrap();
        assert_eq!(origin(data.path()).unwrap(), first);
        assert!(first.as_str().starts_with("inst_"));
    }
}
