//go:build !linux

package gateway

// hostClaim is not supported here: every claim succeeds (see hostclaim.go).
type hostClaim struct{}

func claimHost(string) (*hostClaim, ClaimHolder, bool, error) {
	return &hostClaim{}, ClaimHolder{}, false, nil
}

func (*hostClaim) release() {}

func claimHolder(string) (ClaimHolder, bool) { return ClaimHolder{}, false }
