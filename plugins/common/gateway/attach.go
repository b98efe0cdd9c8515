package gateway

import (
	"context"
	"sync"
)

// AttachAll attaches devices through conn with up to parallel attaches in
// flight at once (0 means 256), so that thousands of devices cost a few round
// trips instead of one each. It returns the devices that failed, with why.
func AttachAll(ctx context.Context, conn Conn, devices []string, parallel int) map[string]error {
	if parallel <= 0 {
		parallel = 256
	}
	var (
		mu     sync.Mutex
		failed = make(map[string]error)
		wg     sync.WaitGroup
		work   = make(chan string)
	)
	for range min(parallel, len(devices)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for id := range work {
				if err := conn.Attach(ctx, id); err != nil {
					mu.Lock()
					failed[id] = err
					mu.Unlock()
				}
			}
		}()
	}
	for _, id := range devices {
		work <- id
	}
	close(work)
	wg.Wait()
	return failed
}
