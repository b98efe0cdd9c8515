package pool

import (
	"slices"

	"github.com/cespare/xxhash/v2"
)

// Rendezvous (highest random weight) hashing, hand-written because the one
// library in Telegraf's dependency tree (dgryski/go-rendezvous) returns only
// the winner, and failover needs a device's whole order of gateways. Each
// (gateway, device) pair gets a pseudo-random weight; a device's order is its
// gateways by decreasing weight. Adding or removing a gateway changes only
// the pairs of that gateway, so only the devices that rank it first move:
// about 1/N of them.

// weight is the score of one gateway for one device: the two xxhash values
// mixed with splitmix64's finalizer, so that similar IDs (dev-00001,
// dev-00002) still spread evenly.
func weight(gatewayHash, deviceHash uint64) uint64 {
	x := gatewayHash ^ deviceHash
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}

func hashID(id string) uint64 { return xxhash.Sum64String(id) }

// order returns the indexes of gateways (given by their hashes) for device,
// best first. Ties, which need a 64-bit collision, go to the lower index.
func order(gatewayHashes []uint64, device string) []uint8 {
	dh := hashID(device)
	idx := make([]uint8, len(gatewayHashes))
	w := make([]uint64, len(gatewayHashes))
	for i, gh := range gatewayHashes {
		idx[i] = uint8(i)
		w[i] = weight(gh, dh)
	}
	slices.SortStableFunc(idx, func(a, b uint8) int {
		switch {
		case w[a] > w[b]:
			return -1
		case w[a] < w[b]:
			return 1
		}
		return 0
	})
	return idx
}
