-- A turn writes less and waits on no one but its own conversation (issue 17).
--
-- Messages written through the API no longer take a feed number when stored: bumping
-- `owners.feed_head` on every message made all of a user's turns wait on one row lock, in every
-- replica. They are stored with `feed_seq` NULL and numbered by the next sync pull, under that
-- lock (src/sync/cloud.rs), which keeps the feed's promise: numbers are handed out in order, so
-- a reader that has seen N never later finds a change numbered below it. Pushed messages and
-- deletions still take theirs at once (they hold the lock anyway). `messages_feed` (owner_id,
-- feed_seq) also finds the unnumbered ones: a btree keeps NULLs, at the end of each owner's.
ALTER TABLE messages ALTER COLUMN feed_seq DROP NOT NULL;

-- Each message moves `updated_at`, and an index on it made every such update write a new
-- entry in each of the table's indexes (no heap-only update). Listing a user's conversations
-- finds them by `conversations_tenant_user_id` and sorts them instead.
DROP INDEX conversations_by_user;

-- Room on each page for the updated row's new version, so the update stays on the page
-- (heap-only). Applies to pages written from now on.
ALTER TABLE conversations SET (fillfactor = 70);
