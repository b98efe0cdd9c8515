package emulator

import (
	"bufio"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"strconv"
	"time"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// maxAdminBody bounds request bodies: configs are at most 64 KB; commands have
// no documented limit, so they get the telemetry limit.
const maxAdminBody = omnicore.MaxTelemetryBytes

// AdminHandler is the HTTP admin API (JSON) alone; the command serves it
// with KORE's REST API and the console (HTTPHandler):
//
//	PUT|POST /v1/registries/{reg}/devices/{dev}/config    body = config payload
//	POST     /v1/registries/{reg}/devices/{dev}/commands  body = command payload, ?subfolder=a/b
//	GET      /v1/info | /v1/devices | /v1/attachments | /v1/connections | /v1/stats
//	GET      /v1/errors[?limit=N]  (the latest N)
//	GET      /v1/telemetry?since=N&limit=M
//	POST     /v1/kick[?client_id=...]
//
// It refuses what a web page could send (see adminGuard): a Host or Origin
// that is not loopback (or an AdminHost), and a request with a body without
// Content-Type: application/json. AdminToken adds a token.
func (s *Server) AdminHandler(opts ...AdminOption) http.Handler {
	mux := http.NewServeMux()
	s.adminRoutes(mux)
	return newGuard(mux, nil, opts)
}

// newGuard puts the admin guard in front of next; public requests need no token.
func newGuard(next http.Handler, public func(*http.Request) bool, opts []AdminOption) *adminGuard {
	g := &adminGuard{next: next, public: public}
	for _, o := range opts {
		o(g)
	}
	return g
}

func (s *Server) adminRoutes(mux *http.ServeMux) {
	mux.HandleFunc("PUT /v1/registries/{reg}/devices/{dev}/config", s.adminConfig)
	mux.HandleFunc("POST /v1/registries/{reg}/devices/{dev}/config", s.adminConfig)
	mux.HandleFunc("POST /v1/registries/{reg}/devices/{dev}/commands", s.adminCommand)
	mux.HandleFunc("GET /v1/devices", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, http.StatusOK, nonNil(s.Devices())) })
	mux.HandleFunc("GET /v1/attachments", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, nonNil(s.AllAttachments()))
	})
	mux.HandleFunc("GET /v1/connections", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, http.StatusOK, s.Connections()) })
	mux.HandleFunc("GET /v1/errors", func(w http.ResponseWriter, r *http.Request) {
		limit, err := queryInt(r.URL.Query().Get("limit"), maxErrorsKept, 1, maxErrorsKept)
		if err != nil {
			writeError(w, http.StatusBadRequest, "limit must be an integer from 1 to "+strconv.Itoa(maxErrorsKept))
			return
		}
		errs := s.ErrorsSent()
		writeJSON(w, http.StatusOK, nonNil(errs[max(len(errs)-limit, 0):]))
	})
	mux.HandleFunc("GET /v1/info", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"subscription": s.subscription, "mqtt": s.URL, "mqtts": s.TLSURL})
	})
	mux.HandleFunc("GET /v1/stats", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, http.StatusOK, s.Stats()) })
	mux.HandleFunc("GET /v1/telemetry", s.adminTelemetry)
	mux.HandleFunc("POST /v1/kick", func(w http.ResponseWriter, r *http.Request) {
		if id := r.URL.Query().Get("client_id"); id != "" {
			if !s.Kick(id) {
				writeError(w, http.StatusNotFound, "no live connection for that client ID")
				return
			}
			writeJSON(w, http.StatusOK, map[string]int{"kicked": 1})
			return
		}
		n := s.Stats().ConnectionsOpen
		s.KickAll()
		writeJSON(w, http.StatusOK, map[string]int{"kicked": n})
	})
}

func (s *Server) adminConfig(w http.ResponseWriter, r *http.Request) {
	body, ok := readBody(w, r, omnicore.MaxConfigBytes)
	if !ok {
		return
	}
	version, err := s.SetConfig(r.PathValue("reg"), r.PathValue("dev"), body)
	if err != nil {
		writeError(w, statusOf(err), err.Error())
		return
	}
	writeJSON(w, http.StatusOK, map[string]int{"version": version})
}

func (s *Server) adminCommand(w http.ResponseWriter, r *http.Request) {
	body, ok := readBody(w, r, maxAdminBody)
	if !ok {
		return
	}
	err := s.SendCommand(r.PathValue("reg"), r.PathValue("dev"), r.URL.Query().Get("subfolder"), body)
	if err != nil {
		writeError(w, statusOf(err), err.Error())
		return
	}
	writeJSON(w, http.StatusOK, map[string]bool{"delivered": true})
}

// TelemetryMessage is a received message as the admin API shows it: the
// payload both as text (for reading) and base64 (exact bytes).
type TelemetryMessage struct {
	Index         int           `json:"index"`
	Time          time.Time     `json:"time"`
	ClientID      string        `json:"client_id"`
	Registry      string        `json:"registry"`
	Device        string        `json:"device"`
	Kind          omnicore.Kind `json:"kind"`
	Subfolder     string        `json:"subfolder,omitempty"`
	Topic         string        `json:"topic"`
	QoS           byte          `json:"qos"`
	PacketID      uint16        `json:"packet_id"`
	Size          int           `json:"size"`
	Payload       string        `json:"payload"`
	PayloadBase64 string        `json:"payload_base64"`
}

// TelemetryPage is the GET /v1/telemetry answer; pass Next as since for
// the following page.
type TelemetryPage struct {
	Next     int                `json:"next"`
	More     bool               `json:"more"`    // messages from Next on are already stored
	Dropped  int                `json:"dropped"` // messages from since on no longer stored (memory budgets)
	Messages []TelemetryMessage `json:"messages"`
}

// Telemetry page sizes: limit defaults to defaultPageLimit, at most maxPageLimit.
const (
	defaultPageLimit = 1000
	maxPageLimit     = 10000
)

func (s *Server) adminTelemetry(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	since, err := queryInt(q.Get("since"), 0, 0, math.MaxInt)
	if err != nil {
		writeError(w, http.StatusBadRequest, "since must be a non-negative integer")
		return
	}
	limit, err := queryInt(q.Get("limit"), defaultPageLimit, 1, maxPageLimit)
	if err != nil {
		writeError(w, http.StatusBadRequest, "limit must be an integer from 1 to "+strconv.Itoa(maxPageLimit))
		return
	}
	page := s.ReceivedPageSince(since, limit)

	// The page is written message by message: a whole page encoded at once
	// would hold every payload several times over (text, base64, the
	// encoder's buffer).
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	bw := bufio.NewWriterSize(w, 64<<10)
	fmt.Fprintf(bw, `{"next":%d,"more":%t,"dropped":%d,"messages":[`, page.Next, page.More, page.Dropped)
	enc := json.NewEncoder(bw)
	for i, m := range page.Messages {
		if i > 0 {
			_ = bw.WriteByte(',')
		}
		if err := enc.Encode(telemetryMessage(m)); err != nil {
			return // the client went away
		}
	}
	_, _ = bw.WriteString("]}\n")
	_ = bw.Flush()
}

func telemetryMessage(m Message) TelemetryMessage {
	return TelemetryMessage{
		Index: m.Index, Time: m.Time, ClientID: m.ClientID, Registry: m.Registry, Device: m.Device,
		Kind: m.Kind, Subfolder: m.Subfolder, Topic: m.Topic, QoS: m.QoS, PacketID: m.PacketID,
		Size: len(m.Payload), Payload: string(m.Payload), PayloadBase64: base64.StdEncoding.EncodeToString(m.Payload),
	}
}

// queryInt parses an optional integer query parameter within [lo, hi].
func queryInt(v string, def, lo, hi int) (int, error) {
	if v == "" {
		return def, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		return 0, err
	}
	if n < lo || n > hi {
		return 0, errors.New("out of range")
	}
	return n, nil
}

func readBody(w http.ResponseWriter, r *http.Request, limit int64) ([]byte, bool) {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, limit))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			writeError(w, http.StatusRequestEntityTooLarge, "body larger than "+strconv.FormatInt(limit, 10)+" bytes")
		} else {
			writeError(w, http.StatusBadRequest, err.Error())
		}
		return nil, false
	}
	return body, true
}

func statusOf(err error) int {
	switch {
	case errors.Is(err, ErrNotFound):
		return http.StatusNotFound
	case errors.Is(err, ErrNotSubscribed):
		return http.StatusConflict
	case errors.Is(err, ErrConfigTooLarge):
		return http.StatusRequestEntityTooLarge
	default:
		return http.StatusBadRequest
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

func writeError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, map[string]string{"error": msg})
}

// nonNil makes empty lists encode as [] rather than null.
func nonNil[T any](s []T) []T {
	if s == nil {
		return []T{}
	}
	return s
}
