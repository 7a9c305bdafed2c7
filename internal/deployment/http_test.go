package deployment

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/cellbridge/cellbridge/bridge"
)

// TestHTTPReplicasNoAnswer: a URL that does not answer is reported by
// name with the records of the others, never dropped silently.
func TestHTTPReplicasNoAnswer(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_ = json.NewEncoder(w).Encode(bridge.Status{RulesVersion: 7})
	}))
	defer up.Close()
	gone := httptest.NewServer(http.NotFoundHandler())
	gone.Close() // nothing listens there any more
	defer http.DefaultTransport.(*http.Transport).CloseIdleConnections()

	for _, tc := range []struct {
		name    string
		urls    []string
		records int
		missing []string // prefixes of NoAnswerError.Missing; nil: no error
		highest int64
	}{
		{"all answer", []string{up.URL}, 1, nil, 7},
		{"one silent", []string{gone.URL, up.URL}, 1, []string{gone.URL + ": no answer: "}, 7},
		{"none answers", []string{gone.URL}, 0, []string{gone.URL + ": no answer: "}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := &HTTP{URLs: tc.urls}
			recs, err := h.Replicas(context.Background())
			if len(recs) != tc.records {
				t.Fatalf("%d records, want %d (err %v)", len(recs), tc.records, err)
			}
			for _, r := range recs {
				if r.Replica != up.URL || r.RulesVersion != 7 {
					t.Errorf("record %+v", r)
				}
			}
			var na *NoAnswerError
			switch {
			case tc.missing == nil && err != nil:
				t.Fatalf("error %v", err)
			case tc.missing != nil && !errors.As(err, &na):
				t.Fatalf("error %v (%T), want a *NoAnswerError", err, err)
			case tc.missing != nil:
				if len(na.Missing) != len(tc.missing) {
					t.Fatalf("missing %q, want %q", na.Missing, tc.missing)
				}
				for i, m := range tc.missing {
					if !strings.HasPrefix(na.Missing[i], m) || len(na.Missing[i]) == len(m) {
						t.Errorf("missing[%d] = %q, want %q and the error", i, na.Missing[i], m)
					}
				}
			}
			v, herr := h.Highest(context.Background())
			if v != tc.highest || (herr == nil) != (tc.missing == nil) {
				t.Errorf("Highest = %d, %v; want %d", v, herr, tc.highest)
			}
		})
	}
}
