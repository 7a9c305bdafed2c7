// GET_ROUTEINFO_BY_TOPIC (105): the name server answers it, and so does the broker port.

package rmqtest

import (
	"encoding/json"
	"strings"
)

type queueData struct {
	BrokerName     string `json:"brokerName"`
	ReadQueueNums  int    `json:"readQueueNums"`
	WriteQueueNums int    `json:"writeQueueNums"`
	Perm           int    `json:"perm"`
	TopicSynFlag   int    `json:"topicSynFlag"`
}

type brokerData struct {
	Cluster     string            `json:"cluster"`
	BrokerName  string            `json:"brokerName"`
	BrokerAddrs map[string]string `json:"brokerAddrs"`
}

type routeData struct {
	QueueDatas  []queueData  `json:"queueDatas"`
	BrokerDatas []brokerData `json:"brokerDatas"`
}

func (b *Broker) handleRoute(req *command) *command {
	name := req.ext("topic")
	b.mu.Lock()
	t := b.topics[name]
	if t == nil && strings.HasPrefix(name, retryPrefix) && len(name) > len(retryPrefix) {
		// The consumer asks for its retry topic's route before its first heartbeat would create it;
		// answering right away spares a 30s wait for the next route refresh.
		t = b.createTopicLocked(name, b.opts.RetryQueues, permReadWrite)
	}
	var rd routeData
	if t != nil {
		rd = routeData{
			QueueDatas: []queueData{{BrokerName: b.opts.BrokerName, ReadQueueNums: len(t.queues),
				WriteQueueNums: len(t.queues), Perm: t.perm}},
			BrokerDatas: []brokerData{{Cluster: b.opts.ClusterName, BrokerName: b.opts.BrokerName,
				BrokerAddrs: map[string]string{"0": b.brAddr}}},
		}
	}
	b.mu.Unlock()
	if t == nil {
		return response(resTopicNotExist, "No topic route info in name server for the topic: "+name)
	}
	body, err := json.Marshal(rd)
	if err != nil {
		return response(resSystemError, err.Error())
	}
	resp := response(resSuccess, "")
	resp.Body = body
	return resp
}
