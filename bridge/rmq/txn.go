package rmq

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/apache/rocketmq-client-go/v2/primitive"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/dedupe"
)

// The transactional sink gives every half message of one idempotency key a
// numbered attempt slot, and keeps records per slot in the dedupe store
// (see the package docs for the argument):
//
//   - used(slot): committed before the slot's half message is sent; it is
//     never reused, so a half message left behind by a dead bridge can
//     never be confused with a later attempt;
//   - decided(slot): committed by the local transaction, a single write
//     that decides "this half message is the one that counts". Check-backs
//     commit exactly the half messages whose slot is decided;
//   - resolved(slot): committed by whoever answered a check-back of the
//     slot's half message, so that a replica waiting for that answer
//     (wait.go) learns it;
//   - rolledback(slot): committed by a check-back before it answers
//     rollback (the slot was not decided when it looked). A decision
//     written later — a commit the store owed and wrote back after the
//     attempt's reservation expired — then does not count: claims take the
//     next slot, later check-backs answer rollback again, a waiting attempt
//     sends again instead of taking the message for delivered, and a local
//     transaction that finds it after its own decision answers rollback.
//
// A new attempt takes the first slot that is neither decided nor used; a
// decided slot means the message is already in the target topic, or will
// be once its check-back commits it (the attempt reports a duplicate, once
// that is settled: wait.go).
//
// The slot travels in the half message's unique id (UNIQ_KEY, the message
// id consumers see), not in a property of its own: a committed half
// message keeps every property it was sent with, and the slot is the
// bridge's business.

// HeaderTxSlot is the user property that carried a transactional half
// message's attempt slot in earlier versions. The sink no longer sets it
// and never sends a header of that name; a check-back still accepts it,
// for half messages sent before an upgrade.
const HeaderTxSlot = "Cell-Tx-Slot"

// maxTxSlots bounds the attempts per idempotency key (within the store's
// TTL): each failed or abandoned half message uses one.
const maxTxSlots = 64

var errSlotBusy = errors.New("an earlier attempt of this message is still being decided")

func storeKeyOf(msgID string, props map[string]string) string {
	if _, dlq := props[bridge.HeaderError]; dlq {
		return msgID + "\x00dlq"
	}
	return msgID
}

func decidedKey(storeKey string, slot int) string {
	return storeKey + "\x00tx-decided\x00" + strconv.Itoa(slot)
}
func usedKey(storeKey string, slot int) string {
	return storeKey + "\x00tx-used\x00" + strconv.Itoa(slot)
}
func resolvedKey(storeKey string, slot int) string {
	return storeKey + "\x00tx-resolved\x00" + strconv.Itoa(slot)
}
func rolledBackKey(storeKey string, slot int) string {
	return storeKey + "\x00tx-rolledback\x00" + strconv.Itoa(slot)
}

// errRolledBack reports an attempt whose half message a check-back rolled
// back although its decision reached the store later: the message is not
// in the topic, and the pipeline sends it again (under the next slot).
var errRolledBack = errors.New("the half message was rolled back by its check-back before its decision reached the dedupe store; sending again")

// slotRef names one half message: its store key and attempt slot.
type slotRef struct {
	key  string
	slot int
}

// The unique id of a half message is the client's usual 32 hex digits —
// IP (8), process id (4), class loader id (8), time (8), counter (4) —
// with the process and class loader digits replaced by slotTag: a 40-bit
// hash of the store key and the slot, then the slot (2 digits). The time
// and counter keep ids unique; the IP keeps what tools read from it.
const (
	uniqLen          = 32
	uniqTagFrom      = 8
	uniqTagTo        = 20
	slotHashHexChars = 10
)

// slotTag is the 12 hex digits that identify (storeKey, slot) in a unique id.
func slotTag(storeKey string, slot int) string {
	sum := sha256.Sum256([]byte(storeKey + "\x00" + strconv.Itoa(slot)))
	return strings.ToUpper(hex.EncodeToString(sum[:slotHashHexChars/2])) + fmt.Sprintf("%02X", slot)
}

// txUniqID returns a fresh unique id carrying (storeKey, slot).
func txUniqID(storeKey string, slot int) string {
	id := primitive.CreateUniqID()
	if len(id) != uniqLen {
		// Not the layout this version of the client produces: build one.
		id = strings.Repeat("0", uniqLen-len(id)%uniqLen) + id
		id = id[len(id)-uniqLen:]
	}
	return id[:uniqTagFrom] + slotTag(storeKey, slot) + id[uniqTagTo:]
}

// slotOfUniq reads the slot from a unique id made by txUniqID for storeKey.
func slotOfUniq(storeKey, id string) (int, bool) {
	if len(id) != uniqLen {
		return 0, false
	}
	n, err := strconv.ParseUint(id[uniqTagTo-2:uniqTagTo], 16, 8)
	if err != nil || n >= maxTxSlots {
		return 0, false
	}
	if !strings.EqualFold(id[uniqTagFrom:uniqTagTo], slotTag(storeKey, int(n))) {
		return 0, false
	}
	return int(n), true
}

// txRef identifies a half message the bridge sent from its properties: the
// store key from Cell-Msg-Id (or else the last of its Keys, where the sink
// puts the idempotency key), the slot from its unique id (or an earlier
// version's Cell-Tx-Slot property). ok is false for anything else, which
// is rolled back.
func txRef(props map[string]string) (slotRef, bool) {
	uniq := props[primitive.PropertyUniqueClientMessageIdKeyIndex]
	cands := []string{props[bridge.HeaderMsgID]}
	if f := strings.Fields(props[primitive.PropertyKeys]); len(f) > 0 {
		cands = append(cands, f[len(f)-1])
	}
	for _, id := range cands {
		if id == "" {
			continue
		}
		key := storeKeyOf(id, props)
		if slot, ok := slotOfUniq(key, uniq); ok {
			return slotRef{key, slot}, true
		}
		if v, ok := props[HeaderTxSlot]; ok {
			if n, err := strconv.Atoi(v); err == nil && n >= 0 && n < maxTxSlots {
				return slotRef{key, n}, true
			}
		}
	}
	return slotRef{}, false
}

// txListener commits decided(slot) inside the local transaction and answers
// check-backs from it.
type txListener struct {
	store   dedupe.Store
	log     *slog.Logger
	timeout time.Duration
	// reuseFor bounds how long after used(K,n) was committed a refused
	// slot n may be taken again (see refused); 0 is refusedFor.
	reuseFor time.Duration
	// waits learns the answers to check-backs (nil in tests that play a
	// crashed sink).
	waits *txWaits

	mu     sync.Mutex
	timers map[*time.Timer]struct{} // settleLater's, until they ran
	closed bool
	// refused holds, per store key, a slot whose half message certainly
	// was not stored (sendNotStored), with when its used record was
	// committed: the key's next claim in this process may take it again
	// (claimSlot) instead of using one more of its maxTxSlots (a broker
	// down for a minute would otherwise use them all and hold the key for
	// the store's TTL).
	refused map[string]refusedSlot
	// usedAt holds, for each slot this process is sending under, when its
	// used record was committed (taken again: when it was first).
	usedAt map[slotRef]time.Time
}

type refusedSlot struct {
	slot int
	used time.Time
}

// refusedFor is the longest reuseFor: far below the dedupe TTL, so that
// used(K,n) cannot have expired and been claimed by another attempt
// meanwhile (the sink uses half the TTL where that is shorter).
const refusedFor = time.Minute

// sendNotStored reports whether a failed half-message send certainly
// stored nothing: no route to the topic was known, or no connection could
// be made (the client sends each half message once: the sink disables its
// retries, and it dials before it writes). An error code is not certain: a
// 5.x proxy answers SYSTEM_ERROR for a broker that timed out, which may
// have stored the message. Nor is a timeout, or a connection lost after
// the request was written.
func sendNotStored(err error) bool {
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" {
		return true
	}
	return strings.Contains(err.Error(), "route info not found")
}

// maxRefused bounds refused and usedAt; beyond it a map starts over (the
// slots are then burnt, as without it).
const maxRefused = 100_000

// sending records that this process sends ref's half message, whose used
// record was committed at used.
func (l *txListener) sending(ref slotRef, used time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.usedAt == nil || len(l.usedAt) >= maxRefused {
		l.usedAt = map[slotRef]time.Time{}
	}
	l.usedAt[ref] = used
}

// sent ends what sending began; a send that certainly stored nothing
// leaves the slot to the key's next claim here.
func (l *txListener) sent(ref slotRef, refused bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	used, ok := l.usedAt[ref]
	delete(l.usedAt, ref)
	if !refused || !ok {
		return
	}
	if l.refused == nil || len(l.refused) >= maxRefused {
		l.refused = map[string]refusedSlot{}
	}
	l.refused[ref.key] = refusedSlot{ref.slot, used}
}

// takeRefused returns the key's refused slot and when its used record was
// committed, if that is within reuseFor, and forgets it.
func (l *txListener) takeRefused(key string) (refusedSlot, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	r, ok := l.refused[key]
	delete(l.refused, key)
	limit := refusedFor
	if l.reuseFor > 0 {
		limit = min(limit, l.reuseFor)
	}
	return r, ok && time.Since(r.used) < limit
}

var _ primitive.TransactionListener = (*txListener)(nil)

// claimSlot picks the attempt slot for a new half message of storeKey and
// marks it used. The caller holds the pipeline's reservation of storeKey.
// When an earlier attempt was decided (the message is in the topic, or
// will be once a check-back commits it), it returns an error wrapping
// bridge.ErrDuplicate and that attempt's slot in decided (else -1); while
// an earlier attempt is being decided right now, errSlotBusy.
func (l *txListener) claimSlot(ctx context.Context, storeKey string) (slot, decided int, err error) {
	reuse, canReuse := l.takeRefused(storeKey)
	for slot := range maxTxSlots {
		dk := decidedKey(storeKey, slot)
		o, err := l.store.Reserve(ctx, dk)
		if err != nil {
			return 0, -1, fmt.Errorf("dedupe reserve: %w", err)
		}
		switch o {
		case dedupe.Duplicate:
			rb, err := l.committed(ctx, rolledBackKey(storeKey, slot))
			if err != nil {
				return 0, -1, fmt.Errorf("dedupe reserve: %w", err)
			}
			if rb {
				continue // decided too late: its half message was rolled back; the slot stays used
			}
			return 0, slot, fmt.Errorf("transactional attempt %d already committed: %w", slot, bridge.ErrDuplicate)
		case dedupe.InFlight:
			return 0, -1, errSlotBusy
		}
		// decided(slot) is ours until the local transaction commits it;
		// was the slot used by an earlier, undecided attempt?
		uk := usedKey(storeKey, slot)
		before := time.Now() // no later than the used record's commit
		o, err = l.store.Reserve(ctx, uk)
		if err != nil {
			_ = l.store.Release(ctx, dk)
			return 0, -1, fmt.Errorf("dedupe reserve: %w", err)
		}
		if o == dedupe.Reserved {
			if err := l.store.Commit(ctx, uk); err != nil {
				_ = l.store.Release(ctx, dk)
				return 0, -1, fmt.Errorf("dedupe commit: %w", err)
			}
			l.sending(slotRef{storeKey, slot}, before)
			return slot, -1, nil
		}
		// Used and never decided: its half message is rolled back by its
		// check-back; never reuse the slot. Unless it is this process's
		// own last attempt, whose half message was certainly not stored,
		// and no attempt came after it (the next slot was never used):
		// then no half message carries the slot, and the key takes it
		// again instead of using up its slots while the broker refuses.
		if o == dedupe.Duplicate && canReuse && slot == reuse.slot && slot+1 < maxTxSlots {
			if free, err := l.absent(ctx, usedKey(storeKey, slot+1)); err == nil && free {
				l.sending(slotRef{storeKey, slot}, reuse.used)
				return slot, -1, nil
			}
		}
		_ = l.store.Release(ctx, dk)
	}
	return 0, -1, fmt.Errorf("more than %d transactional attempts for one message", maxTxSlots)
}

// wasResolved reports whether a check-back of ref's half message was
// answered (by any replica) according to the store.
func (l *txListener) wasResolved(ctx context.Context, ref slotRef) bool {
	ok, err := l.committed(ctx, resolvedKey(ref.key, ref.slot))
	return err == nil && ok
}

// peekCommitted is committed, read without a write where the store is a
// dedupe.Checker. Such a read may come from a replica of the store that has
// not applied the latest write yet; it is used only where that can cost a
// duplicate, never a loss (ExecuteLocalTransaction).
func (l *txListener) peekCommitted(ctx context.Context, key string) (bool, error) {
	c, ok := l.store.(dedupe.Checker)
	if !ok {
		return l.committed(ctx, key)
	}
	o, err := c.Check(ctx, key)
	return err == nil && o == dedupe.Duplicate, err
}

// rolledBack returns errRolledBack when a check-back rolled ref's half
// message back (its decision reached the store only after that), an error
// when the store cannot say (the message is sent again either way), and
// nil when the decision stands.
func (l *txListener) rolledBack(ctx context.Context, ref slotRef) error {
	switch rb, err := l.committed(ctx, rolledBackKey(ref.key, ref.slot)); {
	case err != nil:
		return fmt.Errorf("transactional attempt %d: whether its check-back rolled it back is unknown, sending again: %w", ref.slot, err)
	case rb:
		return fmt.Errorf("transactional attempt %d: %w", ref.slot, errRolledBack)
	}
	return nil
}

// absent reads whether key is neither committed nor reserved in the store.
func (l *txListener) absent(ctx context.Context, key string) (bool, error) {
	o, err := l.read(ctx, key)
	return err == nil && o == dedupe.Reserved, err
}

// committed reads whether key is committed in the store.
func (l *txListener) committed(ctx context.Context, key string) (bool, error) {
	o, err := l.read(ctx, key)
	return err == nil && o == dedupe.Duplicate, err
}

// read is key's state as Reserve sees it, leaving nothing behind (a
// reservation it took is released at once).
func (l *txListener) read(ctx context.Context, key string) (dedupe.Outcome, error) {
	o, err := l.store.Reserve(ctx, key)
	if err == nil && o == dedupe.Reserved {
		_ = l.store.Release(ctx, key)
	}
	return o, err
}

// ExecuteLocalTransaction runs right after the half message was stored:
// committing decided(slot) is the decision. When that write fails the
// answer is unknown, not rollback: the write may have been applied all
// the same, and only a check-back, which reads the store again, may
// decide then (the next attempt of the message waits for it, see
// wait.go).
func (l *txListener) ExecuteLocalTransaction(m *primitive.Message) primitive.LocalTransactionState {
	return l.decide(m.GetProperties(), func(ctx context.Context, ref slotRef, dk string) primitive.LocalTransactionState {
		if err := l.store.Commit(ctx, dk); err != nil {
			l.log.Warn("transactional send: dedupe commit of the decision failed; the broker's check-back decides", "err", err)
			// Never removes a commit: if the write was applied after all, the
			// check-back commits the half message, else it rolls it back.
			_ = l.store.Release(context.WithoutCancel(ctx), dk)
			return primitive.UnkonwnState
		}
		// A decision that took longer than the reservation may come after
		// a check-back that found none and rolled the half message back.
		// Read without writing where the store can (one read on every
		// send instead of a create and a purge).
		rb, err := l.peekCommitted(ctx, rolledBackKey(ref.key, ref.slot))
		switch {
		case err != nil:
			return primitive.UnkonwnState // the check-back decides, from both records
		case rb:
			l.log.Warn("transactional send: a check-back rolled the half message back before its decision reached the dedupe store; sending again")
			return primitive.RollbackMessageState
		}
		return primitive.CommitMessageState
	})
}

// decide answers for the half message whose properties are props: a
// message without a transaction reference is rolled back; else answer
// runs with the message's reference and its decided key, under a context
// bounded by the listener's timeout.
func (l *txListener) decide(props map[string]string, answer func(ctx context.Context, ref slotRef, dk string) primitive.LocalTransactionState) primitive.LocalTransactionState {
	ref, ok := txRef(props)
	if !ok {
		return primitive.RollbackMessageState
	}
	ctx, cancel := context.WithTimeout(context.Background(), l.timeout)
	defer cancel()
	return answer(ctx, ref, decidedKey(ref.key, ref.slot))
}

// CheckLocalTransaction answers the broker's check-back of a half message
// whose end-transaction never arrived.
func (l *txListener) CheckLocalTransaction(m *primitive.MessageExt) primitive.LocalTransactionState {
	st := l.check(m)
	l.log.Info("transaction check-back answered", "msg_id", m.MsgId, "state", stateName(st))
	return st
}

func (l *txListener) check(m *primitive.MessageExt) primitive.LocalTransactionState {
	return l.decide(m.GetProperties(), func(ctx context.Context, ref slotRef, dk string) primitive.LocalTransactionState {
		rk := rolledBackKey(ref.key, ref.slot)
		switch rb, err := l.committed(ctx, rk); {
		case err != nil:
			return primitive.UnkonwnState
		case rb: // answered rollback before (that answer may have been lost)
			l.settleLater(ref, false)
			return primitive.RollbackMessageState
		}
		o, err := l.store.Reserve(ctx, dk)
		st := primitive.RollbackMessageState
		switch {
		case err != nil:
			return primitive.UnkonwnState
		case o == dedupe.InFlight:
			return primitive.UnkonwnState // its attempt is alive (or its reservation not yet expired)
		case o == dedupe.Duplicate:
			st = primitive.CommitMessageState
		default:
			// Its attempt died before its local transaction, or lost its
			// reservation while writing it: the rollback is recorded
			// before it is answered, so that the decision, should it
			// still reach the store, does not count.
			err := l.store.Commit(ctx, rk)
			_ = l.store.Release(ctx, dk)
			if err != nil {
				return primitive.UnkonwnState
			}
		}
		l.settleLater(ref, st == primitive.CommitMessageState)
		return st
	})
}

// checkBackSettle is how long after answering a check-back the answer is
// made known (settle). The client writes the answer's end-transaction right
// after CheckLocalTransaction returns, one way; a bridge killed within that
// time leaves the answer unknown, so the half message is checked again and
// nobody acts on an end-transaction that may be lost.
const checkBackSettle = time.Second

// settleLater runs settle checkBackSettle after a final check-back answer.
func (l *txListener) settleLater(ref slotRef, committed bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return
	}
	if l.timers == nil {
		l.timers = map[*time.Timer]struct{}{}
	}
	var t *time.Timer
	t = time.AfterFunc(checkBackSettle, func() {
		l.mu.Lock()
		_, live := l.timers[t]
		delete(l.timers, t)
		l.mu.Unlock()
		if live {
			l.settle(ref, committed)
		}
	})
	l.timers[t] = struct{}{}
}

// settle makes a check-back answer known: a committed half message's key
// is committed (a redelivery of its message is a duplicate at once), and
// resolved(slot) tells the replicas waiting for the answer (wait.go).
func (l *txListener) settle(ref slotRef, committed bool) {
	ctx, cancel := context.WithTimeout(context.Background(), l.timeout)
	defer cancel()
	if committed {
		if err := l.store.Commit(ctx, ref.key); err != nil {
			l.log.Debug("transaction check-back: dedupe commit of the message key failed", "err", err)
		}
	}
	if err := l.store.Commit(ctx, resolvedKey(ref.key, ref.slot)); err != nil {
		l.log.Debug("transaction check-back: dedupe commit of the answer failed", "err", err)
	}
	if l.waits != nil {
		l.waits.resolved(ref)
	}
}

// close drops the answers not settled yet (the broker checks their half
// messages again, and whoever answers then settles them).
func (l *txListener) close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.closed = true
	for t := range l.timers {
		t.Stop()
		delete(l.timers, t)
	}
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

// txProducer is the part of the client's transaction producer the sink
// uses.
type txProducer interface {
	SendMessageInTransaction(ctx context.Context, m *primitive.Message) (*primitive.TransactionSendResult, error)
}

// txSend sends msg (built from out) as a half message under a new slot;
// once decided and ended it returns *errEnded (the worker hands the send to
// the confirmer, confirm.go). A claim that finds an earlier attempt decided
// returns *errPending (the worker parks the send until that attempt's
// check-back was answered, see wait.go) unless the store says it was
// answered already: then bridge.ErrDuplicate.
func (l *txListener) txSend(ctx context.Context, p txProducer, out *bridge.Outgoing, msg *primitive.Message) error {
	key := storeKeyOf(out.MsgID, msg.GetProperties())
	slot, decided, err := l.claimSlot(ctx, key)
	if decided >= 0 {
		ref := slotRef{key, decided}
		if l.waits != nil && !l.wasResolved(ctx, ref) {
			return &errPending{ref}
		}
		// Answered: read the rollback record again, which the answer
		// writes before it (the claim read it before the answer).
		if rerr := l.rolledBack(ctx, ref); rerr != nil {
			return rerr
		}
		return err
	}
	if err != nil {
		return err
	}
	msg.WithProperty(primitive.PropertyUniqueClientMessageIdKeyIndex, txUniqID(key, slot))
	res, err := p.SendMessageInTransaction(ctx, msg)
	l.sent(slotRef{key, slot}, err != nil && res == nil && sendNotStored(err))
	if err == nil && res.State != primitive.CommitMessageState {
		// Not decided, or the local transaction could not record its
		// decision (then the next attempt finds out which, at its claim).
		err = fmt.Errorf("half message not committed (send status %d, local state %s)", res.Status, stateName(res.State))
	}
	if err != nil {
		// Undecided: give the slot up (it stays used, so it is never
		// taken again); a half message stored after all is rolled back by
		// end-transaction or its check-back. A send that certainly stored
		// nothing leaves no half message: the key's next attempt here
		// takes the slot again.
		_ = l.store.Release(context.WithoutCancel(ctx), decidedKey(key, slot))
		return err
	}
	// Decided and ended; confirmed once the broker read the
	// end-transaction (confirm.go).
	e := &errEnded{ref: slotRef{key, slot}}
	if res.MessageQueue != nil {
		e.mq = *res.MessageQueue
	}
	return e
}
