// Package retry runs the requests the bridge makes to a broker's control
// plane (a JetStream API call: stream and consumer lookups and updates, the
// KV bucket set-up, a consumer reset or unpin; the first connect) one way:
//
//   - each attempt has its own timeout (Policy.Timeout), so one request that
//     gets no answer (a server frozen, a leader election) costs one timeout
//     and never the caller's whole deadline; the client library's default
//     timeout applies only to contexts without a deadline, which is why the
//     attempt is wrapped here;
//   - an attempt is not sent while the connection is down (a request left in
//     the client's reconnect buffer would reach the server late, after the
//     caller gave up on it): it waits for the connection within its timeout;
//   - a failed attempt that is worth repeating (Transient: no answer, no
//     responders, a JetStream service temporarily unavailable, an unreachable
//     or unresolvable host) is logged with the broker, the server, the
//     operation, the error, the attempt number and the wait before the next
//     one, reported (metrics, readiness) and repeated after a capped
//     exponential backoff until the caller's context ends; any other error
//     ends the request at once.
//
// Do is the one loop; the JetStream source, the stream provisioning, the KV
// dedupe store and the connect of bridge/natsjs all call it.
package retry
