package upstreams

import "testing"

func TestReceipt_Worst(t *testing.T) {
	t.Parallel()
	ref := func(cs ...Class) Receipt {
		var rc Receipt
		for _, c := range cs {
			rc.Refused = append(rc.Refused, Refusal{Rcpt: c.String() + "@example.net", Err: &Error{Class: c}})
		}
		return rc
	}
	if w := (Receipt{ProviderID: "x"}).Worst(); w != nil {
		t.Errorf("nothing refused: Worst = %v, want nil", w)
	}
	for _, tc := range []struct {
		rc   Receipt
		want Class
	}{
		{ref(Rejected), Rejected},
		{ref(Unsupported, Rejected, Transient), Transient},
		{ref(Transient, Ambiguous, Rejected), Ambiguous},
		{ref(SenderRejected, ProviderFault), ProviderFault},
		{ref(Unsupported, Rejected), Rejected},
	} {
		if w := tc.rc.Worst(); w == nil || w.Class != tc.want {
			t.Errorf("Worst of %v = %v, want %v", tc.rc.RefusedRcpts(), w, tc.want)
		}
	}
}
