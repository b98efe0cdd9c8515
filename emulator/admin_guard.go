package emulator

import (
	"crypto/subtle"
	"mime"
	"net"
	"net/http"
	"net/url"
	"strings"
)

// AdminOption configures AdminHandler.
type AdminOption func(*adminGuard)

// AdminHost accepts host (a DNS name or IP address, without port: the host
// the admin listener was given) in the Host and Origin headers, besides the
// loopback names that are always accepted.
func AdminHost(host string) AdminOption {
	return func(g *adminGuard) {
		if host = normalizeHost(host); host != "" {
			g.hosts = append(g.hosts, host)
		}
	}
}

// AdminToken requires the token on every request, as "Authorization: Bearer
// <token>" or "x-api-key: <token>" (KORE's two ways), except for the
// console's static files, which hold no data and no token.
func AdminToken(token string) AdminOption { return func(g *adminGuard) { g.token = token } }

// adminGuard keeps web pages away from the admin API. A page the developer
// visits can send a request to 127.0.0.1 without asking (a "simple" CORS
// request: GET, or POST with a form or text/plain body), and a DNS-rebinding
// page can even read the answers, because its own host name then points at
// 127.0.0.1. So:
//
//   - the Host header must be a loopback name or the admin host: a rebinding
//     page sends its own name;
//   - an Origin header, which browsers add to cross-origin requests, must be
//     one of those hosts too;
//   - a request with a body (POST, PUT, PATCH; a DELETE that has one) must
//     say Content-Type: application/json, which a browser only sends after
//     a CORS preflight (OPTIONS) that this API never grants; a DELETE
//     without a body always needs that preflight;
//   - with a token, every request must carry it (but public ones: GETs of
//     the console's files).
//
// net/http's CrossOriginProtection covers only the unsafe methods and trusts
// requests without Sec-Fetch-Site/Origin, and nothing in the standard library
// checks Host, hence this small handler.
type adminGuard struct {
	hosts  []string // accepted besides loopback names, normalized
	token  string
	public func(*http.Request) bool // requests that need no token
	next   http.Handler
}

func (g *adminGuard) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !g.hostAllowed(r.Host) {
		g.refuse(w, r, http.StatusForbidden, "PERMISSION_DENIED", "the Host header is not a loopback name or the admin host: refused (DNS rebinding protection)")
		return
	}
	for _, origin := range r.Header.Values("Origin") {
		u, err := url.Parse(origin)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || !g.hostAllowed(u.Host) {
			g.refuse(w, r, http.StatusForbidden, "PERMISSION_DENIED", "cross-origin request refused: the Origin is not a loopback or admin host")
			return
		}
	}
	if g.token != "" && (g.public == nil || !g.public(r)) && !g.tokenGiven(r) {
		w.Header().Set("WWW-Authenticate", `Bearer realm="omnicore-emulator"`)
		g.refuse(w, r, http.StatusUnauthorized, "UNAUTHENTICATED", "missing or wrong token (Authorization: Bearer or x-api-key)")
		return
	}
	bodyless := r.Method == http.MethodGet || r.Method == http.MethodHead ||
		(r.Method == http.MethodDelete && r.ContentLength == 0)
	if !bodyless {
		mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
		if err != nil || mt != "application/json" {
			g.refuse(w, r, http.StatusUnsupportedMediaType, "INVALID_ARGUMENT", "requests other than GET need Content-Type: application/json (whatever the body holds)")
			return
		}
	}
	g.next.ServeHTTP(w, r)
}

func (g *adminGuard) tokenGiven(r *http.Request) bool {
	got := r.Header.Get("x-api-key")
	if got == "" {
		scheme, bearer, _ := strings.Cut(r.Header.Get("Authorization"), " ")
		if !strings.EqualFold(scheme, "Bearer") {
			return false
		}
		got = bearer
	}
	return subtle.ConstantTimeCompare([]byte(got), []byte(g.token)) == 1
}

// refuse answers in the shape of the API asked: KORE's error body under
// /omnicore/, the admin API's elsewhere.
func (g *adminGuard) refuse(w http.ResponseWriter, r *http.Request, code int, status, msg string) {
	if strings.HasPrefix(r.URL.Path, "/omnicore/") {
		writeKoreError(w, "", &restError{code, status, msg})
		return
	}
	writeError(w, code, msg)
}

// hostAllowed checks a Host header or URL host (with or without port).
func (g *adminGuard) hostAllowed(hostport string) bool {
	host := hostport
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		host = h
	}
	host = normalizeHost(host)
	if host == "" {
		return false
	}
	if IsLoopbackHost(host) {
		return true
	}
	for _, h := range g.hosts {
		if h == host {
			return true
		}
	}
	return false
}

// normalizeHost lower-cases a host and strips IPv6 brackets; an IP address
// gets its canonical form.
func normalizeHost(host string) string {
	host = strings.ToLower(strings.TrimSuffix(strings.TrimPrefix(host, "["), "]"))
	if ip := net.ParseIP(host); ip != nil {
		return ip.String()
	}
	return host
}

// IsLoopbackHost reports whether host (no port) is "localhost" or a loopback
// IP address (127.0.0.0/8, ::1).
func IsLoopbackHost(host string) bool {
	host = normalizeHost(host)
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
