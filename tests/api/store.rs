//! The store contract, checked directly through the `ConversationStore` trait. The suite takes
//! any store, so every implementation answers to the same tests.

use std::io::Write;
use std::sync::Arc;

use maestra::domain::{ConversationId, NewMessage, Role, SurfaceId, UserId};
use maestra::store::{ConversationStore, FileStore, Owner, StoreError};

fn owner(user: &str) -> Owner {
    Owner {
        tenant: "t1".to_owned(),
        user_id: UserId::parse(user).unwrap(),
    }
}

fn conversation(id: &str) -> ConversationId {
    ConversationId::parse(id).unwrap()
}

fn user_message(surface: &str, text: &str) -> NewMessage {
    NewMessage {
        id: None,
        role: Role::User,
        surface_id: SurfaceId::parse(surface).unwrap(),
        content: text.to_owned(),
        model: None,
        usage: None,
        api_key_id: None,
    }
}

mod suite {
    use super::*;

    pub async fn a_question_comes_back_with_the_messages_before_it(store: &dyn ConversationStore) {
        let (ana, conv) = (owner("ana"), conversation("conv_question"));
        for i in 1..=4 {
            let (asked, history) = store
                .append_question(&ana, &conv, user_message("cli", &format!("q{i}")), 3)
                .await
                .unwrap();
            assert_eq!(asked.message.seq, i);
            let seqs: Vec<i64> = history.iter().map(|m| m.seq).collect();
            assert_eq!(seqs, ((i - 2).max(1)..=i).collect::<Vec<_>>());
            assert_eq!(history.last().unwrap().content, format!("q{i}"));
        }
    }

    pub async fn appends_are_numbered_and_read_back_in_order(store: &dyn ConversationStore) {
        let (ana, conv) = (owner("ana"), conversation("conv_order"));
        for i in 1..=5 {
            let stored = store
                .append(&ana, &conv, user_message("cli", &format!("m{i}")))
                .await
                .unwrap();
            assert_eq!(stored.seq, i);
        }
        let all = store.messages(&ana, &conv, 0, 100).await.unwrap();
        let contents: Vec<&str> = all.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(contents, ["m1", "m2", "m3", "m4", "m5"]);
        let after = store.messages(&ana, &conv, 3, 1).await.unwrap();
        assert_eq!(after.len(), 1);
        assert_eq!(after[0].seq, 4);
    }

    pub async fn recent_returns_the_last_messages_oldest_first(store: &dyn ConversationStore) {
        let (ana, conv) = (owner("ana"), conversation("conv_recent"));
        for i in 1..=50 {
            store
                .append(&ana, &conv, user_message("cli", &format!("m{i}")))
                .await
                .unwrap();
        }
        for limit in [1, 3, 20, 45, 100] {
            let recent = store.recent(&ana, &conv, limit).await.unwrap();
            let seqs: Vec<i64> = recent.iter().map(|m| m.seq).collect();
            let first = 50 - limit.min(50) as i64 + 1;
            assert_eq!(seqs, (first..=50).collect::<Vec<_>>(), "limit {limit}");
        }
    }

    /// How a store answers another owner's append to an id that is taken.
    #[derive(Clone, Copy)]
    pub enum TakenIds {
        /// One file per id (local mode): refused as not found.
        Refused,
        /// Ids scoped by owner (cloud mode): the other owner's own, separate conversation.
        Separate,
    }

    pub async fn conversations_are_private_to_their_owner(
        store: &dyn ConversationStore,
        taken: TakenIds,
    ) {
        let conv = conversation("conv_private");
        store
            .append(&owner("ana"), &conv, user_message("cli", "mine"))
            .await
            .unwrap();
        let mallory = owner("mallory");
        let other_tenant = Owner {
            tenant: "t2".to_owned(),
            user_id: UserId::parse("ana").unwrap(),
        };
        for intruder in [&mallory, &other_tenant] {
            assert!(matches!(
                store.messages(intruder, &conv, 0, 10).await,
                Err(StoreError::NotFound)
            ));
            assert!(matches!(
                store.messages(intruder, &conv, 0, 10).await,
                Err(StoreError::NotFound)
            ));
            assert!(matches!(
                store.recent(intruder, &conv, 10).await,
                Err(StoreError::NotFound)
            ));
            assert!(matches!(
                store.delete(intruder, &conv).await,
                Err(StoreError::NotFound)
            ));
            assert!(store.list(intruder, 0, 10).await.unwrap().is_empty());
            let appended = store
                .append(intruder, &conv, user_message("cli", "theirs"))
                .await;
            match taken {
                TakenIds::Refused => assert!(matches!(appended, Err(StoreError::NotFound))),
                TakenIds::Separate => {
                    assert_eq!(appended.unwrap().seq, 1, "a conversation of their own");
                    let theirs = store.messages(intruder, &conv, 0, 10).await.unwrap();
                    assert_eq!(theirs.len(), 1);
                    assert_eq!(theirs[0].content, "theirs");
                }
            }
        }
        let mine = store.messages(&owner("ana"), &conv, 0, 10).await.unwrap();
        assert_eq!(mine.len(), 1);
        assert_eq!(mine[0].content, "mine");
    }

    pub async fn concurrent_appends_get_distinct_seqs(store: Arc<dyn ConversationStore>) {
        let conv = conversation("conv_race");
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let (store, conv) = (Arc::clone(&store), conv.clone());
                tokio::spawn(async move {
                    for i in 0..25 {
                        store
                            .append(
                                &owner("ana"),
                                &conv,
                                user_message(&format!("s{t}"), &format!("{t}-{i}")),
                            )
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let all = store.messages(&owner("ana"), &conv, 0, 1000).await.unwrap();
        let seqs: Vec<i64> = all.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
    }

    pub async fn delete_removes_the_conversation(store: &dyn ConversationStore) {
        let (ana, conv) = (owner("ana"), conversation("conv_delete"));
        store
            .append(&ana, &conv, user_message("cli", "bye"))
            .await
            .unwrap();
        store.delete(&ana, &conv).await.unwrap();
        assert!(matches!(
            store.messages(&ana, &conv, 0, 10).await,
            Err(StoreError::NotFound)
        ));
        assert!(
            store
                .list(&ana, 0, 10)
                .await
                .unwrap()
                .iter()
                .all(|c| c.conversation_id != conv)
        );
        // The id can be used again, for a new conversation.
        assert_eq!(
            store
                .append(&ana, &conv, user_message("cli", "again"))
                .await
                .unwrap()
                .seq,
            1
        );
    }
}

fn file_store(dir: &std::path::Path) -> FileStore {
    FileStore::open(dir.join("conversations"), &dir.join("journal"), 20).unwrap()
}

#[tokio::test]
async fn file_store_passes_the_store_suite() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(dir.path());
    suite::a_question_comes_back_with_the_messages_before_it(&store).await;
    suite::appends_are_numbered_and_read_back_in_order(&store).await;
    suite::recent_returns_the_last_messages_oldest_first(&store).await;
    suite::conversations_are_private_to_their_owner(&store, suite::TakenIds::Refused).await;
    suite::delete_removes_the_conversation(&store).await;
    suite::concurrent_appends_get_distinct_seqs(Arc::new(store)).await;
}

#[tokio::test]
async fn a_torn_last_record_is_dropped_and_the_earlier_messages_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (ana, conv) = (owner("ana"), conversation("conv_torn"));
    {
        let store = file_store(dir.path());
        for i in 1..=3 {
            store
                .append(&ana, &conv, user_message("cli", &format!("m{i}")))
                .await
                .unwrap();
        }
    }
    // What a crash in the middle of the fourth write leaves behind.
    let path = dir.path().join("conversations/conv_torn.json");
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    file.write_all(br#"{"type":"message","id":"msg_x","seq":4,"role":"us"#)
        .unwrap();
    drop(file);

    let store = file_store(dir.path());
    let messages = store.messages(&ana, &conv, 0, 100).await.unwrap();
    assert_eq!(
        messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    let next = store
        .append(&ana, &conv, user_message("cli", "m4"))
        .await
        .unwrap();
    assert_eq!(next.seq, 4);

    // And the file is whole again: a fresh store reads all four.
    let reopened = file_store(dir.path());
    assert_eq!(
        reopened.messages(&ana, &conv, 0, 100).await.unwrap().len(),
        4
    );
}

#[tokio::test]
async fn a_file_torn_at_creation_counts_as_no_conversation() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(dir.path());
    let path = dir.path().join("conversations/conv_new.json");
    std::fs::write(
        &path,
        br#"{"type":"conversation","conversation_id":"conv_n"#,
    )
    .unwrap();
    let (ana, conv) = (owner("ana"), conversation("conv_new"));
    assert!(matches!(
        store.messages(&ana, &conv, 0, 10).await,
        Err(StoreError::NotFound)
    ));
    assert!(!path.exists(), "the torn file is cleared away");
    assert_eq!(
        store
            .append(&ana, &conv, user_message("cli", "first"))
            .await
            .unwrap()
            .seq,
        1
    );
}

#[tokio::test]
async fn a_damaged_line_inside_a_file_does_not_hide_the_messages_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let (ana, conv) = (owner("ana"), conversation("conv_damaged"));
    {
        let store = file_store(dir.path());
        for i in 1..=3 {
            store
                .append(&ana, &conv, user_message("cli", &format!("m{i}")))
                .await
                .unwrap();
        }
    }
    let path = dir.path().join("conversations/conv_damaged.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let damaged = text.replacen(r#""content":"m2""#, r#""content":"m2"#, 1);
    std::fs::write(&path, damaged).unwrap();

    let store = file_store(dir.path());
    let seqs: Vec<i64> = store
        .messages(&ana, &conv, 0, 10)
        .await
        .unwrap()
        .iter()
        .map(|m| m.seq)
        .collect();
    assert_eq!(seqs, [1, 3]);
    assert_eq!(
        store
            .append(&ana, &conv, user_message("cli", "m4"))
            .await
            .unwrap()
            .seq,
        4
    );
}

#[sqlx::test]
async fn postgres_store_passes_the_store_suite(pool: sqlx::PgPool) {
    sqlx::query("INSERT INTO tenants (id) VALUES ('t1'), ('t2')")
        .execute(&pool)
        .await
        .unwrap();
    let store = maestra::store::PgStore::new(pool);
    suite::a_question_comes_back_with_the_messages_before_it(&store).await;
    suite::appends_are_numbered_and_read_back_in_order(&store).await;
    suite::recent_returns_the_last_messages_oldest_first(&store).await;
    suite::conversations_are_private_to_their_owner(&store, suite::TakenIds::Separate).await;
    suite::delete_removes_the_conversation(&store).await;
    suite::concurrent_appends_get_distinct_seqs(Arc::new(store)).await;
}

/// A question's append reads the messages before it in the same statement, whose snapshot is
/// taken before it waits for the conversation's row: a message another writer commits
/// meanwhile is still in the history.
#[sqlx::test]
async fn postgres_question_history_holds_a_message_committed_while_it_waited(pool: sqlx::PgPool) {
    sqlx::query("INSERT INTO tenants (id) VALUES ('t1')")
        .execute(&pool)
        .await
        .unwrap();
    let store = Arc::new(maestra::store::PgStore::new(pool.clone()));
    let (ana, conv) = (owner("ana"), conversation("conv_race"));
    store
        .append(&ana, &conv, user_message("cli", "first"))
        .await
        .unwrap();
    // Another writer holds the conversation's row while it stores its message.
    let mut other = pool.begin().await.unwrap();
    sqlx::query(
        "WITH c AS (UPDATE conversations SET last_seq = last_seq + 1
                    WHERE id = 'conv_race' RETURNING pk, owner_id, last_seq, last_created_at)
         INSERT INTO messages (conversation_pk, seq, id, role, surface_id, content, created_at,
                               owner_id)
         SELECT pk, last_seq, 'msg_other', 'user', 'mobile', 'meanwhile',
                last_created_at + interval '1 millisecond', owner_id FROM c",
    )
    .execute(&mut *other)
    .await
    .unwrap();
    let asking = {
        let (store, ana, conv) = (Arc::clone(&store), ana.clone(), conv.clone());
        tokio::spawn(async move {
            store
                .append_question(&ana, &conv, user_message("cli", "third"), 20)
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!asking.is_finished(), "the question waits for the row");
    other.commit().await.unwrap();
    let (asked, history) = asking.await.unwrap();
    assert_eq!(asked.message.seq, 3);
    let contents: Vec<&str> = history.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(contents, ["first", "meanwhile", "third"]);
}
