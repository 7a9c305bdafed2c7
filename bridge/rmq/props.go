package rmq

import (
	"strings"

	"github.com/apache/rocketmq-client-go/v2/primitive"
)

// systemProps are properties the client or the broker sets or interprets.
// A source does not pass them on as headers (they describe the source
// message: its queue offsets, retry state, transaction) and a sink never
// sends a header under such a name (a header named DELAY or TRAN_MSG would
// change how the target broker stores the message).
var systemProps = map[string]bool{
	primitive.PropertyKeys: true, primitive.PropertyTags: true, primitive.PropertyWaitStoreMsgOk: true,
	primitive.PropertyDelayTimeLevel: true, primitive.PropertyRetryTopic: true, primitive.PropertyTimerDeliverMS: true,
	primitive.PropertyRealTopic: true, primitive.PropertyRealQueueId: true, primitive.PropertyTransactionPrepared: true,
	primitive.PropertyProducerGroup: true, primitive.PropertyMinOffset: true, primitive.PropertyMaxOffset: true,
	primitive.PropertyBuyerId: true, primitive.PropertyOriginMessageId: true, primitive.PropertyTransferFlag: true,
	primitive.PropertyCorrectionFlag: true, primitive.PropertyReconsumeTime: true, primitive.PropertyMsgRegion: true,
	primitive.PropertyTraceSwitch: true, primitive.PropertyUniqueClientMessageIdKeyIndex: true,
	primitive.PropertyMaxReconsumeTimes: true, primitive.PropertyConsumeStartTime: true,
	primitive.PropertyTranscationPreparedQueueOffset: true, primitive.PropertyTranscationCheckTimes: true,
	primitive.PropertyCheckImmunityTimeInSeconds: true, primitive.PropertyShardingKey: true,
	primitive.PropertyTransactionID: true, primitive.PropertyCorrelationID: true,
	primitive.PropertyMessageReplyToClient: true, primitive.PropertyMessageTTL: true,
	primitive.PropertyReplyMessageArriveTime: true, primitive.PropertyMsgType: true, primitive.PropertyCluster: true,
	"INSTANCE_ID": true, "__STARTDELIVERTIME": true, "bname": true, "TIMER_DELAY_SEC": true, "TIMER_DELAY_MS": true,
	"TIMER_OUT_MS": true, "TIMER_ENQUEUE_MS": true, "TIMER_DEQUEUE_MS": true, "TIMER_ROLL_TIMES": true,
	"INNER_NUM": true, "INNER_BASE": true, "__BORNHOST": true, "DLQ_ORIGIN_TOPIC": true, "DLQ_ORIGIN_MESSAGE_ID": true,
}

// validProp reports whether s can travel as a property name or value: the
// wire format separates properties with \x01 and \x02.
func validProp(s string) bool {
	return !strings.ContainsAny(s, "\x01\x02")
}

// passedProps are the system properties a source passes on as headers of
// the same name, and a sink turns back into the copy's tag and keys.
var passedProps = map[string]bool{primitive.PropertyTags: true, primitive.PropertyKeys: true}

// userHeader copies the user properties of a pulled message, and its TAGS
// and KEYS, into a header map (nil when there are none).
func userHeader(props map[string]string) map[string][]string {
	var h map[string][]string
	for k, v := range props {
		if systemProps[k] && !passedProps[k] {
			continue
		}
		if h == nil {
			h = make(map[string][]string, len(props)+6) // room for the Cell-* headers
		}
		h[k] = []string{v}
	}
	return h
}
