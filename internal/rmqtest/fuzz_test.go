package rmqtest

import (
	"bytes"
	"reflect"
	"testing"
	"unicode/utf8"
)

func FuzzDecodeFrame(f *testing.F) {
	for _, ser := range []byte{serializeJSON, serializeRocketMQ} {
		frame, err := encodeFrame(&command{Code: 10, Opaque: 7, ExtFields: map[string]string{"topic": "t", "a": "b"}, Body: []byte("x"), serialize: ser})
		if err != nil {
			f.Fatal(err)
		}
		f.Add(frame[4:])
	}
	f.Add([]byte{0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		cmd, err := decodeFrame(data)
		if err != nil {
			return
		}
		// What decodes re-encodes and decodes to the same command (JSON carries valid UTF-8 only).
		if cmd.serialize == serializeJSON && !validUTF8(cmd) {
			return
		}
		frame, err := encodeFrame(cmd)
		if err != nil {
			return
		}
		again, err := readFrame(bytes.NewReader(frame))
		if err != nil {
			t.Fatalf("re-decode: %v", err)
		}
		if again.Code != cmd.Code || again.Opaque != cmd.Opaque || again.Flag != cmd.Flag ||
			!bytes.Equal(again.Body, cmd.Body) || !reflect.DeepEqual(again.ExtFields, cmd.ExtFields) {
			t.Fatalf("round trip: %+v vs %+v", again, cmd)
		}
	})
}

func FuzzDecodeBatch(f *testing.F) {
	f.Add([]byte{0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		items, err := decodeBatch(data)
		if err != nil {
			return
		}
		for _, it := range items {
			if it.props == nil {
				t.Fatal("nil properties")
			}
		}
	})
}

func TestCodecRoundTrip(t *testing.T) {
	for _, ser := range []byte{serializeJSON, serializeRocketMQ} {
		in := &command{Code: 320, Language: "GO", Version: 317, Opaque: 42, Flag: flagOneway, Remark: "r",
			ExtFields: map[string]string{"a": "g", "b": "topic"}, Body: []byte{1, 2, 3}, serialize: ser}
		frame, err := encodeFrame(in)
		if err != nil {
			t.Fatal(err)
		}
		out, err := readFrame(bytes.NewReader(frame))
		if err != nil {
			t.Fatal(err)
		}
		if out.Code != in.Code || out.Language != "GO" || out.Version != 317 || out.Opaque != 42 || out.Flag != flagOneway ||
			out.Remark != "r" || !reflect.DeepEqual(out.ExtFields, in.ExtFields) || !bytes.Equal(out.Body, in.Body) {
			t.Fatalf("serialize %d: %+v", ser, out)
		}
	}
}

func validUTF8(c *command) bool {
	for k, v := range c.ExtFields {
		if !utf8.ValidString(k) || !utf8.ValidString(v) {
			return false
		}
	}
	return utf8.ValidString(c.Remark)
}
