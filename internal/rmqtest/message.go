package rmqtest

import (
	"bytes"
	"compress/zlib"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"hash/crc32"
	"io"
	"net"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Property names the broker reads or writes (the client's primitive package uses the same strings).
const (
	propKeys           = "KEYS"
	propTags           = "TAGS"
	propDelayLevel     = "DELAY"
	propRetryTopic     = "RETRY_TOPIC"
	propRealTopic      = "REAL_TOPIC"
	propRealQueueID    = "REAL_QID"
	propTranPrepared   = "TRAN_MSG"
	propProducerGroup  = "PGROUP"
	propOriginMsgID    = "ORIGIN_MESSAGE_ID"
	propUniqKey        = "UNIQ_KEY"
	propMaxReconsume   = "MAX_RECONSUME_TIMES"
	propTranCheckTimes = "TRANSACTION_CHECK_TIMES"
)

// Message system flags.
const (
	sysFlagCompressed   = 0x1
	sysFlagTranMask     = 0x3 << 2
	sysFlagTranPrepared = 0x1 << 2
	sysFlagTranCommit   = 0x2 << 2
	sysFlagTranRollback = 0x3 << 2
	sysFlagBornHostV6   = 0x1 << 4
	sysFlagStoreHostV6  = 0x1 << 5
)

const (
	nameValueSep = '\x01'
	propertySep  = '\x02'
	// maxPropertiesLen is what the int16 length field of a stored message can carry.
	maxPropertiesLen = 32767
	// maxTopicLen is what the int8 length field of a stored message can carry.
	maxTopicLen = 127
	// messageMagic marks a stored message (the value of the 4.x store).
	messageMagic = 0xDAA320A7
)

// stored is one message as the broker keeps it.
type stored struct {
	topic          string
	queueID        int
	queueOffset    int64
	commitOffset   int64 // unique, grows with every stored message (also half and scheduled ones)
	sysFlag        int32
	flag           int32
	body           []byte // as sent (compressed when sysFlag says so)
	props          map[string]string
	bornTimestamp  int64 // ms
	bornHost       *net.TCPAddr
	storeTimestamp int64 // ms
	storeHost      *net.TCPAddr
	reconsumeTimes int32
	preparedOffset int64
	size           int32 // encoded size, fixed at store time
}

// parseProperties decodes "k\x01v\x02k\x01v\x02".
func parseProperties(s string) map[string]string {
	m := make(map[string]string)
	for _, item := range strings.Split(s, string(propertySep)) {
		k, v, ok := strings.Cut(item, string(nameValueSep))
		if ok && k != "" {
			m[k] = v
		}
	}
	return m
}

// encodeProperties encodes properties in sorted key order, so equal maps encode equally.
func encodeProperties(m map[string]string) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		b.WriteString(k)
		b.WriteByte(nameValueSep)
		b.WriteString(m[k])
		b.WriteByte(propertySep)
	}
	return b.String()
}

func cloneProps(m map[string]string) map[string]string {
	out := make(map[string]string, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

// batchItem is one message of a SEND_BATCH_MESSAGE body.
type batchItem struct {
	flag  int32
	body  []byte
	props map[string]string
}

var errBadBatch = errors.New("rmqtest: malformed batch body")

// decodeBatch decodes the client's batch encoding: per message TOTALSIZE, MAGIC, BODYCRC, FLAG,
// BODYLEN + body, PROPLEN(int16) + properties.
func decodeBatch(data []byte) ([]batchItem, error) {
	var items []batchItem
	for len(data) > 0 {
		if len(data) < 20 {
			return nil, errBadBatch
		}
		total := int(int32(binary.BigEndian.Uint32(data)))
		if total < 22 || total > len(data) {
			return nil, errBadBatch
		}
		m := data[:total]
		data = data[total:]
		flag := int32(binary.BigEndian.Uint32(m[12:]))
		blen := int(int32(binary.BigEndian.Uint32(m[16:])))
		if blen < 0 || 20+blen+2 > len(m) {
			return nil, errBadBatch
		}
		body := append([]byte(nil), m[20:20+blen]...)
		p := 20 + blen
		plen := int(binary.BigEndian.Uint16(m[p:]))
		p += 2
		if p+plen != len(m) {
			return nil, errBadBatch
		}
		items = append(items, batchItem{flag: flag, body: body, props: parseProperties(string(m[p : p+plen]))})
	}
	if len(items) == 0 {
		return nil, errBadBatch
	}
	return items, nil
}

func hostBytes(a *net.TCPAddr) ([]byte, int32, bool) {
	if a == nil {
		return make([]byte, 4), 0, false
	}
	if ip4 := a.IP.To4(); ip4 != nil {
		return ip4, int32(a.Port), false
	}
	ip := a.IP.To16()
	if ip == nil {
		ip = make([]byte, 16)
	}
	return ip, int32(a.Port), true
}

// offsetMsgID is the broker-side message id: store host IP, port and commit log offset, in hex.
func offsetMsgID(storeHost *net.TCPAddr, commitOffset int64) string {
	ip, port, _ := hostBytes(storeHost)
	b := make([]byte, 0, len(ip)+12)
	b = append(b, ip...)
	b = binary.BigEndian.AppendUint32(b, uint32(port))
	b = binary.BigEndian.AppendUint64(b, uint64(commitOffset))
	return strings.ToUpper(hex.EncodeToString(b))
}

// encode appends the stored-message encoding the client's DecodeMessage reads. Field order matters.
func (m *stored) encode(dst []byte) []byte {
	props := []byte(encodeProperties(m.props))
	born, bornPort, bornV6 := hostBytes(m.bornHost)
	store, storePort, storeV6 := hostBytes(m.storeHost)
	sysFlag := m.sysFlag
	if bornV6 {
		sysFlag |= sysFlagBornHostV6
	} else {
		sysFlag &^= sysFlagBornHostV6
	}
	if storeV6 {
		sysFlag |= sysFlagStoreHostV6
	} else {
		sysFlag &^= sysFlagStoreHostV6
	}
	size := 4 + 4 + 4 + 4 + 4 + 8 + 8 + 4 + 8 + len(born) + 4 + 8 + len(store) + 4 + 4 + 8 +
		4 + len(m.body) + 1 + len(m.topic) + 2 + len(props)
	b := dst
	b = binary.BigEndian.AppendUint32(b, uint32(size))               // TOTALSIZE
	b = binary.BigEndian.AppendUint32(b, uint32(messageMagic))       // MAGICCODE
	b = binary.BigEndian.AppendUint32(b, crc32.ChecksumIEEE(m.body)) // BODYCRC
	b = binary.BigEndian.AppendUint32(b, uint32(m.queueID))          // QUEUEID
	b = binary.BigEndian.AppendUint32(b, uint32(m.flag))             // FLAG
	b = binary.BigEndian.AppendUint64(b, uint64(m.queueOffset))      // QUEUEOFFSET
	b = binary.BigEndian.AppendUint64(b, uint64(m.commitOffset))     // PHYSICALOFFSET
	b = binary.BigEndian.AppendUint32(b, uint32(sysFlag))            // SYSFLAG
	b = binary.BigEndian.AppendUint64(b, uint64(m.bornTimestamp))    // BORNTIMESTAMP
	b = append(b, born...)                                           // BORNHOST
	b = binary.BigEndian.AppendUint32(b, uint32(bornPort))           //
	b = binary.BigEndian.AppendUint64(b, uint64(m.storeTimestamp))   // STORETIMESTAMP
	b = append(b, store...)                                          // STOREHOST
	b = binary.BigEndian.AppendUint32(b, uint32(storePort))          //
	b = binary.BigEndian.AppendUint32(b, uint32(m.reconsumeTimes))   // RECONSUMETIMES
	b = binary.BigEndian.AppendUint64(b, uint64(m.preparedOffset))   // PREPARED TRANSACTION OFFSET
	b = binary.BigEndian.AppendUint32(b, uint32(len(m.body)))        // BODYLEN
	b = append(b, m.body...)                                         //
	b = append(b, byte(len(m.topic)))                                // TOPICLEN
	b = append(b, m.topic...)                                        //
	b = binary.BigEndian.AppendUint16(b, uint16(len(props)))         // PROPERTIESLEN
	b = append(b, props...)                                          //
	return b
}

// encodedSize is the length encode produces.
func (m *stored) encodedSize() int32 {
	return int32(len(m.encode(nil)))
}

// plainBody returns the body uncompressed.
func (m *stored) plainBody() []byte {
	if m.sysFlag&sysFlagCompressed == 0 {
		return append([]byte(nil), m.body...)
	}
	r, err := zlib.NewReader(bytes.NewReader(m.body))
	if err != nil {
		return append([]byte(nil), m.body...)
	}
	defer r.Close()
	out, err := io.ReadAll(r)
	if err != nil {
		return append([]byte(nil), m.body...)
	}
	return out
}

// Message is a stored message as the inspection API returns it. It is a copy: changing it does not
// change the broker.
type Message struct {
	Topic       string
	QueueID     int
	QueueOffset int64
	// CommitLogOffset is unique across the broker; the client sends it back in send-back and
	// end-transaction requests.
	CommitLogOffset int64
	// MsgID is what the client reports as MsgId: the UNIQ_KEY property, else OffsetMsgID.
	MsgID       string
	OffsetMsgID string
	Tags        string
	Keys        string
	// Properties holds every property, system ones (UNIQ_KEY, TAGS, KEYS, ...) included.
	Properties     map[string]string
	Body           []byte // uncompressed
	SysFlag        int32
	Flag           int32
	BornTimestamp  time.Time
	BornHost       string
	StoreTimestamp time.Time
	StoreHost      string
	ReconsumeTimes int32
}

func (m *stored) export() Message {
	id := offsetMsgID(m.storeHost, m.commitOffset)
	msgID := m.props[propUniqKey]
	if msgID == "" {
		msgID = id
	}
	return Message{
		Topic: m.topic, QueueID: m.queueID, QueueOffset: m.queueOffset, CommitLogOffset: m.commitOffset,
		MsgID: msgID, OffsetMsgID: id, Tags: m.props[propTags], Keys: m.props[propKeys],
		Properties: cloneProps(m.props), Body: m.plainBody(), SysFlag: m.sysFlag, Flag: m.flag,
		BornTimestamp: time.UnixMilli(m.bornTimestamp), BornHost: addrString(m.bornHost),
		StoreTimestamp: time.UnixMilli(m.storeTimestamp), StoreHost: addrString(m.storeHost),
		ReconsumeTimes: m.reconsumeTimes,
	}
}

func addrString(a *net.TCPAddr) string {
	if a == nil {
		return ""
	}
	return a.String()
}

// tagsHash is the Java String.hashCode of a tag, which the client puts in subscription code sets.
func tagsHash(s string) int32 {
	var h int32
	for _, c := range []byte(s) {
		h = 31*h + int32(c)
	}
	return h
}

func fmtInt(n int64) string { return strconv.FormatInt(n, 10) }
