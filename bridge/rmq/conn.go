package rmq

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/apache/rocketmq-client-go/v2/primitive"
	"github.com/apache/rocketmq-client-go/v2/producer"
	"github.com/apache/rocketmq-client-go/v2/rlog"
)

// BrokerConfig is how to reach one RocketMQ cluster (a `type: rocketmq`
// broker of the bridge configuration).
type BrokerConfig struct {
	// Name is the broker name in the bridge configuration; it appears in
	// Message.Source, instance names, logs and errors.
	Name string
	// NameServers are IP:port addresses. Host names are refused: the client
	// rejects them at its first request, long after start-up, and its
	// domain resolver calls a vendor host over HTTP.
	NameServers []string
	// AccessKey and SecretKey, both or neither, sign every request (ACL).
	AccessKey, SecretKey string
	// Namespace prefixes topics and groups on the server side.
	Namespace string
	// InstancePrefix starts every client instance name; default
	// "cellbridge". The client pools connections per IP@instance name, so
	// every producer and consumer gets its own name (prefix, broker, pid,
	// counter).
	InstancePrefix string
	// Transactional makes the sink publish half messages committed through
	// the dedupe store (exactlyOnce: transactional); sources ignore it.
	Transactional bool
	// CheckBackWait bounds how long a transactional sink holds the order
	// key of a half message that only a check-back can still commit (see
	// the package docs); set it to the broker's transactionCheckInterval
	// plus transactionTimeout plus a margin. Default DefaultCheckBackWait
	// (a 4.x broker's 60 s + 6 s + 4 s); a 5.x broker checks every 30 s.
	CheckBackWait time.Duration
	// SendTimeout bounds one send attempt to this broker (the client's
	// send and, for a transactional target, the store calls of its
	// attempt); 0 takes SinkConfig.SendTimeout. Sources ignore it.
	SendTimeout time.Duration
	// MessageGroups sets each copy's RocketMQ 5.x message group (the
	// __SHARDINGKEY property) to its order key. A 5.x proxy refuses a
	// message with a group in a topic whose message type is not FIFO (or
	// MIXED), and one without a group in a FIFO topic; a 4.x broker stores
	// the property and ignores it. Sources ignore it.
	MessageGroups bool
}

// DefaultCheckBackWait is BrokerConfig.CheckBackWait's default.
const DefaultCheckBackWait = 70 * time.Second

// Defaults of the client's connection bounds (SetRemotingTimeouts; those
// of the NATS brokers).
const (
	DefaultDialTimeout  = 2 * time.Second
	DefaultWriteTimeout = 2 * time.Second
	// DefaultSendTimeout bounds one send attempt (SinkConfig.SendTimeout,
	// the ackTimeout of the NATS brokers).
	DefaultSendTimeout = 3 * time.Second
	// remotingReadTimeout is the client's read deadline, renewed before
	// each frame: an idle connection is closed after it. It stays the
	// client's default, far above a pull's long poll.
	remotingReadTimeout = 120 * time.Second
)

// SetRemotingTimeouts bounds every connection attempt of the process's
// RocketMQ clients to a name server or broker by dial (the client's own
// default is 15 s) and every write that carries no deadline of its own by
// write (one-way requests: end-transactions, check-back answers, consumer
// offset updates; the client's own default is 120 s). A write blocked on a
// broker that stopped reading holds its connection's lock, so every later
// request on that connection waits too, whatever its own timeout: after
// write the connection is closed and made again. Values of zero or less
// mean the defaults above.
//
// The client keeps these in one structure for the whole process, which its
// options write without synchronization. So they are set once, before the
// first client is made: the first call wins, and a Source or Sink made
// before any call sets the defaults.
func SetRemotingTimeouts(dial, write time.Duration) {
	remotingOnce.Do(func() {
		if dial <= 0 {
			dial = DefaultDialTimeout
		}
		if write <= 0 {
			write = DefaultWriteTimeout
		}
		// The only way to reach the structure is a client's option; this
		// producer is never started (it opens no connection and starts no
		// goroutine) and is dropped.
		_, err := producer.NewDefaultProducer(
			producer.WithRemotingTimeout(dial, remotingReadTimeout, write),
			producer.WithNsResolver(primitive.NewPassthroughResolver([]string{"127.0.0.1:9876"})),
			producer.WithInstanceName("cellbridge-remoting-settings"),
		)
		if log := logTarget.Load(); err != nil && log != nil {
			log.Warn("cannot set the client's connection timeouts; its defaults apply", "err", err)
		}
	})
}

var remotingOnce sync.Once

// remotingDefaults applies the default connection bounds unless
// SetRemotingTimeouts ran already; every client is made after it.
func remotingDefaults() { SetRemotingTimeouts(0, 0) }

func (c BrokerConfig) checkBackWait() time.Duration {
	if c.CheckBackWait > 0 {
		return c.CheckBackWait
	}
	return DefaultCheckBackWait
}

// Validate reports the first problem of c, naming the field.
func (c BrokerConfig) Validate() error {
	if len(c.NameServers) == 0 {
		return fmt.Errorf("rocketmq broker %q: nameservers: at least one IP:port required", c.Name)
	}
	for i, ns := range c.NameServers {
		host, port, err := net.SplitHostPort(ns)
		if err != nil {
			return fmt.Errorf("rocketmq broker %q: nameservers[%d]: want IP:port, got %q: %w", c.Name, i, ns, err)
		}
		if net.ParseIP(host) == nil {
			return fmt.Errorf("rocketmq broker %q: nameservers[%d]: %q is not an IP address; the RocketMQ client accepts IP:port only (resolve the host name in the deployment, e.g. a Service ClusterIP)", c.Name, i, ns)
		}
		if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
			return fmt.Errorf("rocketmq broker %q: nameservers[%d]: bad port in %q", c.Name, i, ns)
		}
	}
	if (c.AccessKey == "") != (c.SecretKey == "") {
		return fmt.Errorf("rocketmq broker %q: accessKey and secretKey go together", c.Name)
	}
	return nil
}

func (c BrokerConfig) resolver() primitive.NsResolver {
	// Never the default resolver: it fetches name servers from a vendor host.
	return primitive.NewPassthroughResolver(append([]string(nil), c.NameServers...))
}

func (c BrokerConfig) credentials() (primitive.Credentials, bool) {
	return primitive.Credentials{AccessKey: c.AccessKey, SecretKey: c.SecretKey}, c.AccessKey != ""
}

var instanceSeq atomic.Int64

// instanceName is unique per client in this process and names what it is
// for, so that broker-side connection lists are readable.
func (c BrokerConfig) instanceName(role string) string {
	p := c.InstancePrefix
	if p == "" {
		p = "cellbridge"
	}
	return fmt.Sprintf("%s-%s-%s-%d-%d", p, sanitize(c.Name), role, os.Getpid(), instanceSeq.Add(1))
}

// sanitize keeps characters RocketMQ accepts in group and instance names.
func sanitize(s string) string {
	return strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '-', r == '_', r == '%':
			return r
		}
		return '_'
	}, s)
}

// ErrClosed is returned (or passed to done) after Close.
var ErrClosed = errors.New("rmq: closed")

// SetLogger routes the RocketMQ client's logging (a process-wide setting of
// the client) to log. The client's Info lines (rebalances, every pull
// state change) go to Debug; Warning to Warn; Error and Fatal to Error.
// The first call installs the adapter in the client, which reads its
// logger without synchronization: make it before the process creates any
// RocketMQ client. Later calls only switch the target logger (safely, at
// any time).
func SetLogger(log *slog.Logger) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	logTarget.Store(log.With("component", "rocketmq-client"))
	logOnce.Do(func() { rlog.SetLogger(&slogAdapter{}) })
}

var (
	logOnce   sync.Once
	logTarget atomic.Pointer[slog.Logger]
)

type slogAdapter struct{}

func (a *slogAdapter) emit(level slog.Level, msg string, fields map[string]any) {
	ctx := context.Background()
	log := logTarget.Load()
	if log == nil || !log.Enabled(ctx, level) || (msg == "" && len(fields) == 0) {
		return
	}
	attrs := make([]slog.Attr, 0, len(fields))
	for k, v := range fields {
		if e, ok := v.(error); ok {
			v = e.Error()
		}
		attrs = append(attrs, slog.Any(k, v))
	}
	log.LogAttrs(ctx, level, msg, attrs...)
}

func (a *slogAdapter) Debug(msg string, f map[string]any)   { a.emit(slog.LevelDebug, msg, f) }
func (a *slogAdapter) Info(msg string, f map[string]any)    { a.emit(slog.LevelDebug, msg, f) }
func (a *slogAdapter) Warning(msg string, f map[string]any) { a.emit(slog.LevelWarn, msg, f) }
func (a *slogAdapter) Error(msg string, f map[string]any)   { a.emit(slog.LevelError, msg, f) }
func (a *slogAdapter) Fatal(msg string, f map[string]any)   { a.emit(slog.LevelError, msg, f) }

// Level is ignored: the slog handler's level decides.
func (a *slogAdapter) Level(string) {}

// OutputPath is ignored: output goes wherever the slog handler writes.
func (a *slogAdapter) OutputPath(string) error { return nil }

var _ rlog.Logger = (*slogAdapter)(nil)
