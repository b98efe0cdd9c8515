package gateway

import (
	"reflect"
	"testing"

	"github.com/stretchr/testify/require"
)

// fullStats has every field of Stats set: scalar field i to i+2 (connected
// true), each map one entry.
func fullStats(t *testing.T) (s Stats, scalars int) {
	t.Helper()
	v := reflect.ValueOf(&s).Elem()
	for i := range v.NumField() {
		f := v.Field(i)
		switch f.Kind() {
		case reflect.Bool:
			f.SetBool(true)
		case reflect.Int, reflect.Int64:
			f.SetInt(int64(i + 2))
		case reflect.Uint64:
			f.SetUint(uint64(i + 2))
		case reflect.Map:
			continue
		default:
			t.Fatalf("Stats.%s: a %s; teach Fields, Add and this test about it", v.Type().Field(i).Name, f.Kind())
		}
		scalars++
	}
	s.ErrorsByType = map[string]uint64{"GATEWAY_ATTACHMENT_ERROR": 100}
	s.DroppedByReason = map[string]uint64{"too_large": 101}
	s.Gauges = map[string]int64{"spool_bytes": 102}
	return s, scalars
}

// Every field of Stats reaches Fields, and Add sums every one: a counter
// added to Stats but not to them fails here (that is how internal_omnicore
// once lacked devices_known).
func TestStatsFieldsCoverEveryCounter(t *testing.T) {
	s, scalars := fullStats(t)
	f := s.Fields()
	require.Len(t, f, scalars+3)
	require.Equal(t, int64(1), f["connected"])
	require.Equal(t, int64(100), f["errors_gateway_attachment_error"])
	require.Equal(t, int64(101), f["dropped_too_large"])
	require.Equal(t, int64(102), f["spool_bytes"])
	for _, name := range []string{"devices_known", "devices_refused", "resent_after_error"} {
		require.Contains(t, f, name)
	}
	seen := map[int64]string{}
	for k, v := range f {
		if k == "connected" {
			continue
		}
		require.NotContains(t, seen, v, "%s and %s carry the same Stats field", k, seen[v])
		seen[v] = k
	}

	sum := s
	sum.ErrorsByType, sum.DroppedByReason, sum.Gauges = nil, nil, nil
	sum.Add(s)
	sum.Add(Stats{Connected: true})
	doubled := s.Fields()
	for k, v := range sum.Fields() {
		if k == "connected" || k == "errors_gateway_attachment_error" || k == "dropped_too_large" || k == "spool_bytes" {
			require.Equal(t, doubled[k], v, k)
			continue
		}
		require.Equal(t, 2*doubled[k], v, "%s is not summed by Add", k)
	}
	sum.Add(Stats{})
	require.Equal(t, int64(0), sum.Fields()["connected"], "connected only while every part is")
}

func TestStatsFieldsNames(t *testing.T) {
	s := Stats{
		ErrorsByType:    map[string]uint64{"GATEWAY_DEVICE_NOT_FOUND": 1, "share-owner silent": 2},
		DroppedByReason: map[string]uint64{"invalid_device": 3},
	}
	f := s.Fields()
	require.Equal(t, int64(1), f["errors_gateway_device_not_found"])
	require.Equal(t, int64(2), f["errors_share_owner_silent"])
	require.Equal(t, int64(3), f["dropped_invalid_device"])
	require.Equal(t, int64(0), f["connected"])
}
