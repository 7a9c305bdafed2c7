package rmq

import (
	"context"
	"log/slog"
	"time"

	"github.com/apache/rocketmq-client-go/v2/primitive"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/dedupe"
)

// txListener commits the dedupe store inside the local transaction and
// answers check-backs from it. Two keys are involved:
//
//   - the message's store key (the idempotency key, as the pipeline
//     reserves it: Keys, plus "\x00dlq" for a DLQ copy);
//   - a transaction key: store key + "\x00tx\x00" + the half message's
//     unique id, committed first, which says "this very half message is
//     the one that counts".
//
// A check-back commits the half message when its transaction key is
// committed; answers unknown while the store key is reserved (an attempt is
// still running, possibly this one); rolls back when the store key was
// committed by another attempt or is neither committed nor reserved (the
// attempt died before its local transaction).
type txListener struct {
	store   dedupe.Store
	log     *slog.Logger
	timeout time.Duration
}

var _ primitive.TransactionListener = (*txListener)(nil)

func storeKeyOf(keys string, props map[string]string) string {
	if _, dlq := props[bridge.HeaderError]; dlq {
		return keys + "\x00dlq"
	}
	return keys
}

func txKeyOf(storeKey, uniq string) string { return storeKey + "\x00tx\x00" + uniq }

// ExecuteLocalTransaction runs right after the half message was stored.
func (l *txListener) ExecuteLocalTransaction(m *primitive.Message) primitive.LocalTransactionState {
	keys := m.GetProperty(primitive.PropertyKeys)
	uniq := m.GetProperty(primitive.PropertyUniqueClientMessageIdKeyIndex)
	if keys == "" || uniq == "" {
		return primitive.RollbackMessageState
	}
	ctx, cancel := context.WithTimeout(context.Background(), l.timeout)
	defer cancel()
	key := storeKeyOf(keys, m.GetProperties())
	if err := l.store.Commit(ctx, txKeyOf(key, uniq)); err != nil {
		l.log.Warn("transactional send: dedupe commit failed; rolling back", "err", err)
		return primitive.RollbackMessageState
	}
	if err := l.store.Commit(ctx, key); err != nil {
		// The transaction key decides; the pipeline commits the store key
		// again after the send.
		l.log.Debug("transactional send: dedupe commit of the message key failed", "err", err)
	}
	return primitive.CommitMessageState
}

// CheckLocalTransaction answers the broker's check-back of a half message
// whose end-transaction never arrived.
func (l *txListener) CheckLocalTransaction(m *primitive.MessageExt) primitive.LocalTransactionState {
	st := l.check(m)
	l.log.Info("transaction check-back answered", "msg_id", m.MsgId, "state", stateName(st))
	return st
}

func (l *txListener) check(m *primitive.MessageExt) primitive.LocalTransactionState {
	keys := m.GetProperty(primitive.PropertyKeys)
	uniq := m.GetProperty(primitive.PropertyUniqueClientMessageIdKeyIndex)
	if keys == "" || uniq == "" {
		return primitive.RollbackMessageState
	}
	ctx, cancel := context.WithTimeout(context.Background(), l.timeout)
	defer cancel()
	key := storeKeyOf(keys, m.GetProperties())
	txKey := txKeyOf(key, uniq)
	o, err := l.store.Reserve(ctx, txKey)
	switch {
	case err != nil:
		return primitive.UnkonwnState
	case o == dedupe.Duplicate:
		return primitive.CommitMessageState
	case o == dedupe.InFlight:
		return primitive.UnkonwnState
	}
	defer func() { _ = l.store.Release(ctx, txKey) }()
	o, err = l.store.Reserve(ctx, key)
	switch {
	case err != nil:
		return primitive.UnkonwnState
	case o == dedupe.Duplicate:
		return primitive.RollbackMessageState // another attempt delivered it
	case o == dedupe.InFlight:
		return primitive.UnkonwnState // an attempt is running; ask again later
	}
	_ = l.store.Release(ctx, key)
	return primitive.RollbackMessageState // the attempt died before its local transaction
}

func stateName(s primitive.LocalTransactionState) string {
	switch s {
	case primitive.CommitMessageState:
		return "commit"
	case primitive.RollbackMessageState:
		return "rollback"
	}
	return "unknown"
}
