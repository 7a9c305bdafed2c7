package rmqtest

import (
	"bufio"
	"net"
	"sync"
	"time"
)

// conn is one client TCP connection to the name server or the broker.
type conn struct {
	b          *Broker
	nc         net.Conn
	nameServer bool
	remote     *net.TCPAddr

	wmu sync.Mutex // serializes frame writes

	closeOnce sync.Once
	closed    chan struct{}

	// guarded by b.mu
	clientID string
}

func (c *conn) close() {
	c.closeOnce.Do(func() {
		close(c.closed)
		c.nc.Close()
	})
}

// serve reads requests until the connection fails, then forgets the client's registrations.
func (c *conn) serve() {
	defer c.b.netWG.Done()
	defer c.b.connClosed(c)
	defer c.close()
	r := bufio.NewReaderSize(c.nc, 64<<10)
	for {
		cmd, err := readFrame(r)
		if err != nil {
			return
		}
		if cmd.isResponse() {
			// Clients answer nothing the broker waits for (check-backs and notifications are oneway).
			continue
		}
		c.b.dispatch(c, cmd)
	}
}

// write sends one frame; a failed write closes the connection (the client reconnects).
func (c *conn) write(cmd *command) {
	frame, err := encodeFrame(cmd)
	if err != nil {
		c.b.logf("encode frame: %v", err)
		return
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	select {
	case <-c.closed:
		return
	default:
	}
	_ = c.nc.SetWriteDeadline(time.Now().Add(writeTimeout))
	if _, err := c.nc.Write(frame); err != nil {
		c.close()
	}
}

// respond writes the response to req.
func (c *conn) respond(req, resp *command) {
	if resp == nil {
		return
	}
	resp.Opaque = req.Opaque
	resp.Flag |= flagResponse
	resp.serialize = req.serialize
	c.write(resp)
}

// response builds a response with a code and remark.
func response(code int16, remark string) *command {
	return &command{Code: code, Language: "JAVA", Version: brokerVersion, Remark: remark, ExtFields: map[string]string{}}
}

// request builds a oneway request the broker sends to a client.
func (b *Broker) onewayRequest(code int16, ext map[string]string, body []byte) *command {
	return &command{
		Code: code, Language: "JAVA", Version: brokerVersion, Opaque: b.nextOpaque(),
		Flag: flagOneway, ExtFields: ext, Body: body,
	}
}
