"""The blocked (online-softmax) attention kernel with its flash backward."""
