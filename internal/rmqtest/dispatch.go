// Request dispatch: the request and response codes, and which handler serves each code. The
// handlers live in one file per request family, named after it: route.go (name server), send.go,
// pull.go, offsets.go (consumer offsets), admin.go (queue offset lookups), groups.go (heartbeats and
// consumer groups), sendback.go (consumer retries), txn.go (transactions), locks.go (orderly queue
// locks); store.go appends to the in-memory queues they share.

package rmqtest

import "fmt"

// Request codes (the client's internal/request.go).
const (
	reqSendMessage             = 10
	reqPullMessage             = 11
	reqQueryConsumerOffset     = 14
	reqUpdateConsumerOffset    = 15
	reqSearchOffsetByTimestamp = 29
	reqGetMaxOffset            = 30
	reqGetMinOffset            = 31
	reqHeartBeat               = 34
	reqUnregisterClient        = 35
	reqConsumerSendMsgBack     = 36
	reqEndTransaction          = 37
	reqGetConsumerListByGroup  = 38
	reqCheckTransactionState   = 39
	reqNotifyConsumerIdsChange = 40
	reqLockBatchMQ             = 41
	reqUnlockBatchMQ           = 42
	reqGetRouteInfoByTopic     = 105
	reqSendMessageV2           = 310
	reqSendBatchMessage        = 320
)

// Response codes (the client's internal/response.go plus the broker's own).
const (
	resSuccess            = 0
	resSystemError        = 1
	resNotSupported       = 3
	resMessageIllegal     = 13
	resServiceUnavailable = 14
	resTopicNotExist      = 17
	resPullNotFound       = 19
	resPullRetryImmediate = 20
	resPullOffsetMoved    = 21
	resQueryNotFound      = 22
)

func (b *Broker) dispatch(c *conn, req *command) {
	b.mu.Lock()
	b.requests[req.Code]++
	netStop := b.netStop
	b.mu.Unlock()
	if refuseIfStopping(c, req, netStop) {
		return
	}
	if c.nameServer {
		switch req.Code {
		case reqGetRouteInfoByTopic:
			c.respond(req, b.handleRoute(req))
		default:
			c.respond(req, response(resNotSupported, fmt.Sprintf("request code %d not supported by the name server", req.Code)))
		}
		return
	}
	switch req.Code {
	case reqSendMessage, reqSendMessageV2, reqSendBatchMessage:
		b.handleSend(c, req)
	case reqPullMessage:
		b.handlePull(c, req)
	case reqHeartBeat:
		c.respond(req, b.handleHeartbeat(c, req))
	case reqUnregisterClient:
		c.respond(req, b.handleUnregister(c, req))
	case reqGetConsumerListByGroup:
		c.respond(req, b.handleConsumerList(req))
	case reqQueryConsumerOffset:
		c.respond(req, b.handleQueryOffset(req))
	case reqUpdateConsumerOffset:
		c.respond(req, b.handleUpdateOffset(req))
	case reqGetMaxOffset, reqGetMinOffset, reqSearchOffsetByTimestamp:
		c.respond(req, b.handleOffsetLookup(req))
	case reqConsumerSendMsgBack:
		c.respond(req, b.handleSendBack(req))
	case reqEndTransaction:
		c.respond(req, b.handleEndTransaction(req))
	case reqLockBatchMQ:
		c.respond(req, b.handleLock(req))
	case reqUnlockBatchMQ:
		c.respond(req, b.handleUnlock(req))
	case reqGetRouteInfoByTopic:
		c.respond(req, b.handleRoute(req))
	default:
		c.respond(req, response(resNotSupported, fmt.Sprintf("request code %d not supported", req.Code)))
	}
}

// refuseIfStopping answers req with restartingResponse when netStop is
// closed (Restart or Close under way) and reports whether it did.
func refuseIfStopping(c *conn, req *command, netStop <-chan struct{}) bool {
	select {
	case <-netStop:
		c.respond(req, restartingResponse())
		return true
	default:
		return false
	}
}

// restartingResponse is a code the client backs off from (3s) and retries.
func restartingResponse() *command {
	return response(resServiceUnavailable, "broker is restarting")
}
