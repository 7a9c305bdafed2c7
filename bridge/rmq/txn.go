package rmq

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"time"

	"github.com/apache/rocketmq-client-go/v2/primitive"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/dedupe"
)

// The transactional sink gives every half message of one idempotency key a
// numbered attempt slot, and keeps two records per slot in the dedupe
// store (see the package docs for the argument):
//
//   - used(slot): committed before the slot's half message is sent; it is
//     never reused, so a half message left behind by a dead bridge can
//     never be confused with a later attempt;
//   - decided(slot): committed by the local transaction, a single write
//     that decides "this half message is the one that counts". Check-backs
//     commit exactly the half messages whose slot is decided.
//
// A new attempt takes the first slot that is neither decided nor used; a
// decided slot means the message is already in the target topic (the
// attempt reports a duplicate).

// HeaderTxSlot is the user property carrying a transactional half
// message's attempt slot.
const HeaderTxSlot = "Cell-Tx-Slot"

// maxTxSlots bounds the attempts per idempotency key (within the store's
// TTL): each failed or abandoned half message uses one.
const maxTxSlots = 64

var errSlotBusy = errors.New("an earlier attempt of this message is still being decided")

func storeKeyOf(keys string, props map[string]string) string {
	if _, dlq := props[bridge.HeaderError]; dlq {
		return keys + "\x00dlq"
	}
	return keys
}

func decidedKey(storeKey string, slot int) string {
	return storeKey + "\x00tx-decided\x00" + strconv.Itoa(slot)
}
func usedKey(storeKey string, slot int) string {
	return storeKey + "\x00tx-used\x00" + strconv.Itoa(slot)
}

// txListener commits decided(slot) inside the local transaction and answers
// check-backs from it.
type txListener struct {
	store   dedupe.Store
	log     *slog.Logger
	timeout time.Duration
}

var _ primitive.TransactionListener = (*txListener)(nil)

// claimSlot picks the attempt slot for a new half message of storeKey and
// marks it used. The caller holds the pipeline's reservation of storeKey.
// It returns an error wrapping bridge.ErrDuplicate when an earlier attempt
// was decided (the message is in the topic), errSlotBusy when an earlier
// attempt is being decided right now.
func (l *txListener) claimSlot(ctx context.Context, storeKey string) (int, error) {
	for slot := range maxTxSlots {
		dk := decidedKey(storeKey, slot)
		o, err := l.store.Reserve(ctx, dk)
		if err != nil {
			return 0, fmt.Errorf("dedupe reserve: %w", err)
		}
		switch o {
		case dedupe.Duplicate:
			return 0, fmt.Errorf("transactional attempt %d already committed: %w", slot, bridge.ErrDuplicate)
		case dedupe.InFlight:
			return 0, errSlotBusy
		}
		// decided(slot) is ours until the local transaction commits it;
		// was the slot used by an earlier, undecided attempt?
		uk := usedKey(storeKey, slot)
		o, err = l.store.Reserve(ctx, uk)
		if err != nil {
			_ = l.store.Release(ctx, dk)
			return 0, fmt.Errorf("dedupe reserve: %w", err)
		}
		if o == dedupe.Reserved {
			if err := l.store.Commit(ctx, uk); err != nil {
				_ = l.store.Release(ctx, dk)
				return 0, fmt.Errorf("dedupe commit: %w", err)
			}
			return slot, nil
		}
		// Used and never decided: its half message is rolled back by its
		// check-back; never reuse the slot.
		_ = l.store.Release(ctx, dk)
	}
	return 0, fmt.Errorf("more than %d transactional attempts for one message", maxTxSlots)
}

func slotOf(props map[string]string) (int, bool) {
	n, err := strconv.Atoi(props[HeaderTxSlot])
	return n, err == nil && n >= 0 && n < maxTxSlots
}

// txKeys reads a half message's store key and attempt slot from its
// properties; ok is false for a message the bridge did not send (no Keys,
// no valid slot), which is rolled back.
func txKeys(props map[string]string) (key string, slot int, ok bool) {
	keys := props[primitive.PropertyKeys]
	slot, ok = slotOf(props)
	if keys == "" || !ok {
		return "", 0, false
	}
	return storeKeyOf(keys, props), slot, true
}

// ExecuteLocalTransaction runs right after the half message was stored:
// committing decided(slot) is the decision.
func (l *txListener) ExecuteLocalTransaction(m *primitive.Message) primitive.LocalTransactionState {
	key, slot, ok := txKeys(m.GetProperties())
	if !ok {
		return primitive.RollbackMessageState
	}
	ctx, cancel := context.WithTimeout(context.Background(), l.timeout)
	defer cancel()
	if err := l.store.Commit(ctx, decidedKey(key, slot)); err != nil {
		l.log.Warn("transactional send: dedupe commit failed; rolling back", "err", err)
		return primitive.RollbackMessageState
	}
	// The message key too, so that a redelivery is a duplicate at once
	// (the pipeline commits it again after the send).
	if err := l.store.Commit(ctx, key); err != nil {
		l.log.Debug("transactional send: dedupe commit of the message key failed", "err", err)
	}
	return primitive.CommitMessageState
}

// CheckLocalTransaction answers the broker's check-back of a half message
// whose end-transaction never arrived.
func (l *txListener) CheckLocalTransaction(m *primitive.MessageExt) primitive.LocalTransactionState {
	st := l.check(m)
	l.log.Info("transaction check-back answered", "msg_id", m.MsgId, "slot", m.GetProperty(HeaderTxSlot), "state", stateName(st))
	return st
}

func (l *txListener) check(m *primitive.MessageExt) primitive.LocalTransactionState {
	key, slot, ok := txKeys(m.GetProperties())
	if !ok {
		return primitive.RollbackMessageState
	}
	ctx, cancel := context.WithTimeout(context.Background(), l.timeout)
	defer cancel()
	dk := decidedKey(key, slot)
	o, err := l.store.Reserve(ctx, dk)
	switch {
	case err != nil:
		return primitive.UnkonwnState
	case o == dedupe.Duplicate:
		// Decided; the bridge may have died before committing the message
		// key: do it now, so that a redelivery is recognised.
		_ = l.store.Commit(ctx, key)
		return primitive.CommitMessageState
	case o == dedupe.InFlight:
		return primitive.UnkonwnState // its attempt is alive (or its reservation not yet expired)
	}
	_ = l.store.Release(ctx, dk)
	return primitive.RollbackMessageState // its attempt died before its local transaction
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
