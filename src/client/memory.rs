//! `maestra ask` continues the last conversation of its surface: the id is remembered per
//! surface and user in `<data>/cli_state.json`, replaced whole (write, fsync, rename) so that
//! a crash leaves the old file or the new one, never half of one.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const FILE_NAME: &str = "cli_state.json";

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    /// surface → user → conversation id.
    #[serde(default)]
    last_conversation: BTreeMap<String, BTreeMap<String, String>>,
}

#[derive(Debug)]
pub struct LastConversations {
    path: PathBuf,
    state: State,
}

impl LastConversations {
    /// The remembered ids; none yet when the file does not exist. A file that cannot be read
    /// as state is only a lost convenience: it is reported and replaced at the next write.
    pub fn load(data_dir: &Path) -> Self {
        let path = data_dir.join(FILE_NAME);
        let state = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                eprintln!(
                    "maestra: ignoring {} ({e}); starting a new conversation",
                    path.display()
                );
                State::default()
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => State::default(),
            Err(e) => {
                eprintln!("maestra: ignoring {} ({e})", path.display());
                State::default()
            }
        };
        Self { path, state }
    }

    pub fn get(&self, surface: &str, user: &str) -> Option<&str> {
        self.state
            .last_conversation
            .get(surface)?
            .get(user)
            .map(String::as_str)
    }

    /// Remembers `conversation` as the last one of this surface and user, durably.
    pub fn remember(&mut self, surface: &str, user: &str, conversation: &str) -> io::Result<()> {
        self.state
            .last_conversation
            .entry(surface.to_owned())
            .or_default()
            .insert(user.to_owned(), conversation.to_owned());
        self.save()
    }

    fn save(&self) -> io::Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let temp = dir.join(format!(".{FILE_NAME}.{}.tmp", std::process::id()));
        let written = (|| {
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temp)?;
            file.write_all(&serde_json::to_vec_pretty(&self.state)?)?;
            file.write_all(b"\n")?;
            file.sync_all()?;
            fs::rename(&temp, &self.path)
        })();
        if written.is_err() {
            let _ = fs::remove_file(&temp);
        }
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remembered_conversation_is_found_again_by_surface_and_user() {
        let dir = tempfile::tempdir().unwrap();
        let mut memory = LastConversations::load(dir.path());
        assert_eq!(memory.get("cli", "ana"), None);
        memory.remember("cli", "ana", "conv_1").unwrap();
        memory.remember("windsurf", "ana", "conv_2").unwrap();
        memory.remember("cli", "bob", "conv_3").unwrap();

        let again = LastConversations::load(dir.path());
        assert_eq!(again.get("cli", "ana"), Some("conv_1"));
        assert_eq!(again.get("windsurf", "ana"), Some("conv_2"));
        assert_eq!(again.get("cli", "bob"), Some("conv_3"));
    }

    #[test]
    fn the_file_is_private_and_no_temporary_file_is_left() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("new-data-dir");
        LastConversations::load(&data)
            .remember("cli", "ana", "conv_1")
            .unwrap();
        let mode = fs::metadata(data.join(FILE_NAME))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let names: Vec<_> = fs::read_dir(&data)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [FILE_NAME]);
    }

    #[test]
    fn an_unreadable_file_is_replaced_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE_NAME), "{not json").unwrap();
        let mut memory = LastConversations::load(dir.path());
        assert_eq!(memory.get("cli", "ana"), None);
        memory.remember("cli", "ana", "conv_1").unwrap();
        assert_eq!(
            LastConversations::load(dir.path()).get("cli", "ana"),
            Some("conv_1")
        );
    }
}
