package rmqtest

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
)

// Serialization types carried in the top byte of the header-length word.
const (
	serializeJSON     = byte(0)
	serializeRocketMQ = byte(1)
)

// maxFrame bounds one remoting frame; the client's own scanner allows 128 MiB, a test broker never
// needs more, and a bound keeps a corrupt length from allocating gigabytes.
const maxFrame = 128 << 20

// Flag bits of a remoting command.
const (
	flagResponse = 1 << 0
	flagOneway   = 1 << 1
)

// command is one remoting request or response.
type command struct {
	Code      int16
	Language  string
	Version   int16
	Opaque    int32
	Flag      int32
	Remark    string
	ExtFields map[string]string
	Body      []byte

	// serialize is the header serialization the command arrived in; responses use the same one.
	serialize byte
}

func (c *command) isResponse() bool { return c.Flag&flagResponse != 0 }
func (c *command) isOneway() bool   { return c.Flag&flagOneway != 0 }

// ext returns an ext field ("" when missing).
func (c *command) ext(k string) string { return c.ExtFields[k] }

func (c *command) extInt(k string) (int64, error) {
	v, ok := c.ExtFields[k]
	if !ok {
		return 0, fmt.Errorf("missing header field %q", k)
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("header field %q: %w", k, err)
	}
	return n, nil
}

// extIntDefault returns the field as int64, or def when missing or malformed.
func (c *command) extIntDefault(k string, def int64) int64 {
	n, err := c.extInt(k)
	if err != nil {
		return def
	}
	return n
}

type jsonHeader struct {
	Code      int16             `json:"code"`
	Language  json.RawMessage   `json:"language,omitempty"`
	Version   int16             `json:"version"`
	Opaque    int32             `json:"opaque"`
	Flag      int32             `json:"flag"`
	Remark    string            `json:"remark,omitempty"`
	ExtFields map[string]string `json:"extFields,omitempty"`
}

var errShortFrame = errors.New("rmqtest: short frame")

// readFrame reads one frame (length prefix included) and decodes it.
func readFrame(r io.Reader) (*command, error) {
	var lenBuf [4]byte
	if _, err := io.ReadFull(r, lenBuf[:]); err != nil {
		return nil, err
	}
	n := binary.BigEndian.Uint32(lenBuf[:])
	if n < 4 || n > maxFrame {
		return nil, fmt.Errorf("rmqtest: frame length %d out of range", n)
	}
	buf := make([]byte, n)
	if _, err := io.ReadFull(r, buf); err != nil {
		return nil, err
	}
	return decodeFrame(buf)
}

// decodeFrame decodes a frame without its leading total-length word.
func decodeFrame(buf []byte) (*command, error) {
	if len(buf) < 4 {
		return nil, errShortFrame
	}
	word := binary.BigEndian.Uint32(buf)
	serialize := byte(word >> 24)
	hlen := int(word & 0xFFFFFF)
	if hlen > len(buf)-4 {
		return nil, fmt.Errorf("rmqtest: header length %d exceeds frame %d", hlen, len(buf)-4)
	}
	header := buf[4 : 4+hlen]
	var (
		cmd *command
		err error
	)
	switch serialize {
	case serializeJSON:
		cmd, err = decodeJSONHeader(header)
	case serializeRocketMQ:
		cmd, err = decodeRocketMQHeader(header)
	default:
		return nil, fmt.Errorf("rmqtest: unknown serialize type %d", serialize)
	}
	if err != nil {
		return nil, err
	}
	cmd.serialize = serialize
	if body := buf[4+hlen:]; len(body) > 0 {
		cmd.Body = body
	}
	return cmd, nil
}

func decodeJSONHeader(h []byte) (*command, error) {
	var jh jsonHeader
	if err := json.Unmarshal(h, &jh); err != nil {
		return nil, fmt.Errorf("rmqtest: json header: %w", err)
	}
	cmd := &command{
		Code: jh.Code, Version: jh.Version, Opaque: jh.Opaque, Flag: jh.Flag,
		Remark: jh.Remark, ExtFields: jh.ExtFields,
	}
	// The language is a quoted name from the Go and Java clients; tolerate a number too.
	var lang string
	if json.Unmarshal(jh.Language, &lang) == nil {
		cmd.Language = lang
	} else {
		cmd.Language = string(jh.Language)
	}
	if cmd.ExtFields == nil {
		cmd.ExtFields = map[string]string{}
	}
	return cmd, nil
}

func decodeRocketMQHeader(h []byte) (*command, error) {
	const fixed = 2 + 1 + 2 + 4 + 4 + 4
	if len(h) < fixed {
		return nil, errShortFrame
	}
	cmd := &command{ExtFields: map[string]string{}}
	cmd.Code = int16(binary.BigEndian.Uint16(h))
	cmd.Language = languageName(h[2])
	cmd.Version = int16(binary.BigEndian.Uint16(h[3:]))
	cmd.Opaque = int32(binary.BigEndian.Uint32(h[5:]))
	cmd.Flag = int32(binary.BigEndian.Uint32(h[9:]))
	p := 13
	rlen := int(int32(binary.BigEndian.Uint32(h[p:])))
	p += 4
	if rlen < 0 || rlen > len(h)-p {
		return nil, errShortFrame
	}
	cmd.Remark = string(h[p : p+rlen])
	p += rlen
	if len(h)-p < 4 {
		return nil, errShortFrame
	}
	elen := int(int32(binary.BigEndian.Uint32(h[p:])))
	p += 4
	if elen < 0 || elen > len(h)-p {
		return nil, errShortFrame
	}
	ext := h[p : p+elen]
	for len(ext) > 0 {
		if len(ext) < 2 {
			return nil, errShortFrame
		}
		kl := int(binary.BigEndian.Uint16(ext))
		ext = ext[2:]
		if kl > len(ext) {
			return nil, errShortFrame
		}
		k := string(ext[:kl])
		ext = ext[kl:]
		if len(ext) < 4 {
			return nil, errShortFrame
		}
		vl := int(int32(binary.BigEndian.Uint32(ext)))
		ext = ext[4:]
		if vl < 0 || vl > len(ext) {
			return nil, errShortFrame
		}
		cmd.ExtFields[k] = string(ext[:vl])
		ext = ext[vl:]
	}
	return cmd, nil
}

func languageName(b byte) string {
	switch b {
	case 0:
		return "JAVA"
	case 9:
		return "GO"
	default:
		return "OTHER"
	}
}

func languageCode(s string) byte {
	switch s {
	case "GO":
		return 9
	default:
		return 0
	}
}

// encodeFrame encodes a command including the leading total-length word.
func encodeFrame(cmd *command) ([]byte, error) {
	var header []byte
	switch cmd.serialize {
	case serializeRocketMQ:
		header = encodeRocketMQHeader(cmd)
	default:
		jh := jsonHeader{
			Code: cmd.Code, Version: cmd.Version, Opaque: cmd.Opaque, Flag: cmd.Flag,
			Remark: cmd.Remark, ExtFields: cmd.ExtFields,
		}
		lang := cmd.Language
		if lang == "" {
			lang = "JAVA"
		}
		jh.Language, _ = json.Marshal(lang)
		var err error
		header, err = json.Marshal(jh)
		if err != nil {
			return nil, fmt.Errorf("rmqtest: encode header: %w", err)
		}
	}
	if len(header) > 0xFFFFFF {
		return nil, errors.New("rmqtest: header too large")
	}
	total := 4 + len(header) + len(cmd.Body)
	out := make([]byte, 4, 4+total)
	binary.BigEndian.PutUint32(out, uint32(total))
	out = binary.BigEndian.AppendUint32(out, uint32(cmd.serialize)<<24|uint32(len(header)))
	out = append(out, header...)
	out = append(out, cmd.Body...)
	return out, nil
}

func encodeRocketMQHeader(cmd *command) []byte {
	var b bytes.Buffer
	b.Write(binary.BigEndian.AppendUint16(nil, uint16(cmd.Code)))
	b.WriteByte(languageCode(cmd.Language))
	b.Write(binary.BigEndian.AppendUint16(nil, uint16(cmd.Version)))
	b.Write(binary.BigEndian.AppendUint32(nil, uint32(cmd.Opaque)))
	b.Write(binary.BigEndian.AppendUint32(nil, uint32(cmd.Flag)))
	b.Write(binary.BigEndian.AppendUint32(nil, uint32(len(cmd.Remark))))
	b.WriteString(cmd.Remark)
	var ext bytes.Buffer
	for k, v := range cmd.ExtFields {
		ext.Write(binary.BigEndian.AppendUint16(nil, uint16(len(k))))
		ext.WriteString(k)
		ext.Write(binary.BigEndian.AppendUint32(nil, uint32(len(v))))
		ext.WriteString(v)
	}
	b.Write(binary.BigEndian.AppendUint32(nil, uint32(ext.Len())))
	b.Write(ext.Bytes())
	return b.Bytes()
}
