package natsjs

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"

	"github.com/cellbridge/cellbridge/internal/natstest"
)

// operator is a throwaway NATS operator with one account, for creds tests.
type operator struct {
	claims  *jwt.OperatorClaims
	accPub  string
	accJWT  string
	account nkeys.KeyPair
}

func newOperator(t *testing.T) operator {
	t.Helper()
	op, err := nkeys.CreateOperator()
	must(t, err)
	opPub, err := op.PublicKey()
	must(t, err)
	oc := jwt.NewOperatorClaims(opPub)
	oc.Name = "test-operator"
	opJWT, err := oc.Encode(op)
	must(t, err)
	claims, err := jwt.DecodeOperatorClaims(opJWT)
	must(t, err)

	acc, err := nkeys.CreateAccount()
	must(t, err)
	accPub, err := acc.PublicKey()
	must(t, err)
	ac := jwt.NewAccountClaims(accPub)
	ac.Name = "cellbridge"
	accJWT, err := ac.Encode(op)
	must(t, err)
	return operator{claims: claims, accPub: accPub, accJWT: accJWT, account: acc}
}

// tune configures a server to trust the operator and know its account.
func (o operator) tune(t *testing.T) func(*server.Options) {
	return func(opts *server.Options) {
		resolver := &server.MemAccResolver{}
		must(t, resolver.Store(o.accPub, o.accJWT))
		opts.TrustedOperators = []*jwt.OperatorClaims{o.claims}
		opts.AccountResolver = resolver
		opts.JetStream = false // the account has no JetStream limits; connecting is what is tested
	}
}

// creds writes a creds file for a new user of the account, signed by signer.
func (o operator) creds(t *testing.T, signer nkeys.KeyPair) string {
	t.Helper()
	user, err := nkeys.CreateUser()
	must(t, err)
	userPub, err := user.PublicKey()
	must(t, err)
	uc := jwt.NewUserClaims(userPub)
	uc.IssuerAccount = o.accPub
	userJWT, err := uc.Encode(signer)
	must(t, err)
	seed, err := user.Seed()
	must(t, err)
	file, err := jwt.FormatUserConfig(userJWT, seed)
	must(t, err)
	path := filepath.Join(t.TempDir(), "user.creds")
	must(t, os.WriteFile(path, file, 0o600))
	return path
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func TestConnectCreds(t *testing.T) {
	op := newOperator(t)
	srv := natstest.Start(t, op.tune(t))
	nc, err := connect(t, BrokerConfig{Name: "nats", URL: srv.URL, Creds: op.creds(t, op.account)})
	if err != nil {
		t.Fatal(err)
	}
	if err := nc.Publish("ping", nil); err != nil {
		t.Fatal(err)
	}

	// A user signed by an account the server does not know is refused.
	stranger, err := nkeys.CreateAccount()
	must(t, err)
	_, err = connect(t, BrokerConfig{Name: "nats", URL: srv.URL, Creds: op.creds(t, stranger)})
	if !errors.Is(err, nats.ErrAuthorization) {
		t.Fatalf("foreign creds: err = %v, want nats.ErrAuthorization", err)
	}
	t.Logf("foreign creds: %v", err)

	_, err = connect(t, BrokerConfig{Name: "nats", URL: srv.URL, Creds: filepath.Join(t.TempDir(), "missing.creds")})
	if !errors.Is(err, ErrConfig) {
		t.Fatalf("missing creds file: err = %v, want ErrConfig", err)
	}
}
