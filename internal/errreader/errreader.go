// Package errreader tells the two ends of a copy apart: when io.Copy
// fails, was it the reader (a client, a spool file) or the writer?
package errreader

import "io"

// Reader remembers the first error other than io.EOF of the reader it
// wraps.
type Reader struct {
	R   io.Reader
	Err error
}

func (r *Reader) Read(p []byte) (int, error) {
	n, err := r.R.Read(p)
	if err != nil && err != io.EOF && r.Err == nil {
		r.Err = err
	}
	return n, err
}
