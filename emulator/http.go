package emulator

import (
	"net/http"
	"strings"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator/console"
)

// HTTPHandler serves, behind the admin API's guard (see AdminHandler and
// adminGuard), all that the command's HTTP listener offers:
//
//	/omnicore/subscriptions/{sub}/...  KORE's device-manager REST API (rest.go)
//	/v1/...                            the admin API: what KORE's API cannot
//	                                   say (connections, attachments, telemetry,
//	                                   errors, stats) and fault switches
//	/console/                          the web console, on both
//
// The console's files are the only requests that need no token.
func (s *Server) HTTPHandler(opts ...AdminOption) http.Handler {
	mux := http.NewServeMux()
	s.adminRoutes(mux)
	s.restRoutes(mux)
	mux.Handle("GET "+console.Prefix, console.Handler())
	mux.Handle("GET /{$}", http.RedirectHandler(console.Prefix, http.StatusFound))
	public := func(r *http.Request) bool {
		return (r.Method == http.MethodGet || r.Method == http.MethodHead) &&
			(r.URL.Path == "/" || strings.HasPrefix(r.URL.Path, console.Prefix))
	}
	return newGuard(mux, public, opts)
}
