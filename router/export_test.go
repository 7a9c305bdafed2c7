package router

// SetReadHook sets a function called after each rule file is read (nil:
// none), for tests outside the package.
func SetReadHook(f func(path string)) { readHook = f }
