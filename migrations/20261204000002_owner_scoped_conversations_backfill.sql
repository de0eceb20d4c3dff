-- Step 2 of 3, backfill: every existing conversation and message gets its owner, its key and
-- its place in the owner's feed (in the order the messages were written).

INSERT INTO owners (tenant_id, user_id)
SELECT DISTINCT tenant_id, user_id FROM conversations;

UPDATE conversations c
SET owner_id = o.id,
    last_created_at = COALESCE(
        (SELECT max(m.created_at) FROM messages m WHERE m.conversation_id = c.id),
        c.created_at)
FROM owners o
WHERE o.tenant_id = c.tenant_id AND o.user_id = c.user_id;

UPDATE messages m
SET conversation_pk = c.pk, owner_id = c.owner_id
FROM conversations c
WHERE c.id = m.conversation_id;

UPDATE messages m
SET feed_seq = numbered.feed_seq
FROM (
    SELECT conversation_pk, seq,
           row_number() OVER (PARTITION BY owner_id ORDER BY created_at, seq, id) AS feed_seq
    FROM messages
) numbered
WHERE numbered.conversation_pk = m.conversation_pk AND numbered.seq = m.seq;

UPDATE owners o
SET feed_head = COALESCE((SELECT max(m.feed_seq) FROM messages m WHERE m.owner_id = o.id), 0);
