// neuron_cache.cpp: placeholder, being written
