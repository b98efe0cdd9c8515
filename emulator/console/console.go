// Package console is the emulator's web console: static HTML, CSS and
// JavaScript, embedded, that read and drive the emulator through its own
// HTTP APIs (KORE's REST API under /omnicore/, the admin API under /v1/).
// Nothing is fetched from elsewhere, and no token is in the files: off
// loopback the page asks for one and keeps it in the tab's sessionStorage.
package console

import (
	"embed"
	"io/fs"
	"net/http"
)

//go:embed static
var files embed.FS

// Handler serves the console's files; mount it under Prefix.
func Handler() http.Handler {
	sub, err := fs.Sub(files, "static")
	if err != nil {
		panic(err) // the embedded tree is fixed at build time
	}
	fsrv := http.StripPrefix(Prefix, http.FileServerFS(sub))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		// The page only talks to its own origin and runs only its own script.
		h.Set("Content-Security-Policy", "default-src 'self'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'none'; base-uri 'none'")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("Cache-Control", "no-cache")
		fsrv.ServeHTTP(w, r)
	})
}

// Prefix is where the console lives.
const Prefix = "/console/"
